// Minimal test harness: TEST_CASE(name) registers a case, CHECK* record failures, main() runs one case or all.
//   pcam_core_tests              run every case
//   pcam_core_tests NAME...      run the named cases
//   pcam_core_tests --list       print the case names
//   pcam_core_tests --expect N.. fail unless exactly the cases N.. are compiled in (keeps CMake's list complete)
#pragma once

#include <cmath>
#include <functional>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace testing {

struct Registry {
    std::map<std::string, std::function<void()>> cases;
    int failures = 0;
    static Registry& get() {
        static Registry registry;
        return registry;
    }
};

struct Register {
    Register(const char* name, std::function<void()> body) { Registry::get().cases.emplace(name, std::move(body)); }
};

inline void fail(const char* file, int line, const std::string& message) {
    ++Registry::get().failures;
    std::cerr << file << ":" << line << ": FAILED: " << message << '\n';
}

inline int main(int argc, char** argv) {
    auto& registry = Registry::get();
    std::vector<std::string> names(argv + 1, argv + argc);
    if (names.size() == 1 && names[0] == "--list") {
        for (const auto& entry : registry.cases) {
            std::cout << entry.first << '\n';
        }
        return 0;
    }
    if (!names.empty() && names[0] == "--expect") {
        const std::set<std::string> expected(names.begin() + 1, names.end());
        int problems = 0;
        for (const auto& entry : registry.cases) {
            if (!expected.count(entry.first)) {
                std::cerr << "test case '" << entry.first << "' is not registered with ctest (CMakeLists.txt)\n";
                ++problems;
            }
        }
        for (const auto& name : expected) {
            if (!registry.cases.count(name)) {
                std::cerr << "ctest lists '" << name << "' but no such test case exists\n";
                ++problems;
            }
        }
        return problems == 0 ? 0 : 1;
    }
    if (names.empty()) {
        for (const auto& entry : registry.cases) {
            names.push_back(entry.first);
        }
    }
    for (const auto& name : names) {
        const auto it = registry.cases.find(name);
        if (it == registry.cases.end()) {
            std::cerr << "unknown test case '" << name << "'\n";
            return 2;
        }
        const int before = registry.failures;
        try {
            it->second();
        } catch (const std::exception& error) {
            fail(name.c_str(), 0, std::string("unexpected exception: ") + error.what());
        }
        std::cout << (registry.failures == before ? "PASS " : "FAIL ") << name << '\n';
    }
    return registry.failures == 0 ? 0 : 1;
}

}  // namespace testing

#define TESTING_CAT2(a, b) a##b
#define TESTING_CAT(a, b) TESTING_CAT2(a, b)
#define TEST_CASE(name)                                                                      \
    static void TESTING_CAT(test_, name)();                                                  \
    static const testing::Register TESTING_CAT(register_, name)(#name, &TESTING_CAT(test_, name)); \
    static void TESTING_CAT(test_, name)()

#define CHECK(condition)                                          \
    do {                                                          \
        if (!(condition)) {                                       \
            testing::fail(__FILE__, __LINE__, "CHECK(" #condition ")"); \
        }                                                         \
    } while (false)

#define CHECK_EQ(a, b)                                                                           \
    do {                                                                                         \
        const auto& check_a_ = (a);                                                              \
        const auto& check_b_ = (b);                                                              \
        if (!(check_a_ == check_b_)) {                                                           \
            std::ostringstream check_message_;                                                   \
            check_message_ << "CHECK_EQ(" #a ", " #b "): " << check_a_ << " != " << check_b_;    \
            testing::fail(__FILE__, __LINE__, check_message_.str());                             \
        }                                                                                        \
    } while (false)

#define CHECK_NEAR(a, b, tolerance)                                                                          \
    do {                                                                                                     \
        const double check_a_ = static_cast<double>(a);                                                      \
        const double check_b_ = static_cast<double>(b);                                                      \
        if (!(std::fabs(check_a_ - check_b_) <= (tolerance))) {                                              \
            std::ostringstream check_message_;                                                               \
            check_message_ << "CHECK_NEAR(" #a ", " #b "): " << check_a_ << " vs " << check_b_ << " (tol " \
                           << (tolerance) << ")";                                                            \
            testing::fail(__FILE__, __LINE__, check_message_.str());                                         \
        }                                                                                                    \
    } while (false)

// Passes when `statement` throws pcam::Error whose message contains every one of the given fragments.
#define CHECK_THROWS_WITH(statement, ...)                                                                 \
    do {                                                                                                  \
        bool check_threw_ = false;                                                                        \
        try {                                                                                             \
            statement;                                                                                    \
        } catch (const pcam::Error& check_error_) {                                                       \
            check_threw_ = true;                                                                          \
            const std::string check_text_ = check_error_.what();                                          \
            for (const std::string& check_fragment_ : std::vector<std::string>{__VA_ARGS__}) {            \
                if (check_text_.find(check_fragment_) == std::string::npos) {                             \
                    testing::fail(__FILE__, __LINE__,                                                     \
                                  "message '" + check_text_ + "' lacks '" + check_fragment_ + "'");       \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        if (!check_threw_) {                                                                              \
            testing::fail(__FILE__, __LINE__, "CHECK_THROWS_WITH(" #statement "): no pcam::Error thrown"); \
        }                                                                                                 \
    } while (false)
