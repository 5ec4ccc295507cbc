// The one exception type of pcam_core: its message names the file, the value found and what was expected.
#pragma once

#include <stdexcept>
#include <string>

namespace pcam {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace pcam
