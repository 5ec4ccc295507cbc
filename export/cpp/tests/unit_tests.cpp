// Unit tests of pcam_core (no TensorRT, no GPU). Each TEST_CASE is one ctest entry (see CMakeLists.txt).
#include <png.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "pcam/args.hpp"
#include "pcam/error.hpp"
#include "pcam/fileio.hpp"
#include "pcam/output.hpp"
#include "pcam/patches.hpp"
#include "pcam/pipeline.hpp"
#include "pcam/sidecar.hpp"
#include "testing.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

class TempDir {
public:
    TempDir() {
        std::random_device entropy;
        path_ = fs::temp_directory_path() / ("pcam_core_tests_" + std::to_string(entropy()));
        fs::create_directories(path_);
    }
    ~TempDir() {
        std::error_code ignored;
        fs::remove_all(path_, ignored);
    }
    std::string file(const std::string& name) const { return (path_ / name).string(); }
    std::size_t entries() const {
        return static_cast<std::size_t>(std::distance(fs::directory_iterator(path_), fs::directory_iterator()));
    }

private:
    fs::path path_;
};

json sidecar_json(bool baked_in = false) {
    json doc = {
        {"format", "timm-inception-pcam-engine/1"},
        {"model", "inception_v4_pcam"},
        {"tensorrt_version", "11.4.0.106"},
        {"gpu", {{"name", "NVIDIA H100 80GB HBM3"}, {"compute_capability", "9.0"}}},
        {"precision", "fp16"},
        {"input", {{"name", "input"}, {"shape", {-1, 3, 96, 96}}, {"dtype", "float32"}, {"layout", "NCHW"}}},
        {"output", {{"name", "logits"}, {"shape", {-1, 2}}, {"dtype", "float32"}, {"activation", "softmax"}}},
        {"profile", {{"min", 1}, {"opt", 64}, {"max", 256}}},
        {"preprocessing",
         {{"baked_in", false},
          {"raw_layout", "NHWC"},
          {"raw_dtype", "uint8"},
          {"scale", 255.0},
          {"mean", {0.7008, 0.5384, 0.6916}},
          {"std", {0.2350, 0.2774, 0.2129}}}},
        {"label_names", {"normal", "metastatic"}},
        {"sha256", {{"checkpoint", nullptr}, {"onnx", std::string(64, 'a')}, {"plan", std::string(64, 'b')}}},
    };
    if (baked_in) {
        doc["preprocessing"]["baked_in"] = true;
        doc["input"] = {{"name", "patches"}, {"shape", {-1, 96, 96, 3}}, {"dtype", "uint8"}, {"layout", "NHWC"}};
    }
    return doc;
}

pcam::Sidecar parse(const json& doc) { return pcam::parse_sidecar(doc.dump(), "model.plan.json"); }

std::vector<std::uint8_t> random_patches(std::size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<std::uint8_t> data(n * pcam::kPatchBytes);
    for (auto& value : data) {
        value = static_cast<std::uint8_t>(byte(rng));
    }
    return data;
}

void write_bytes(const std::string& path, const void* data, std::size_t size) {
    std::ofstream out(path, std::ios::binary);
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
}

// Writes an 8-bit PNG with libpng's simplified API; format is PNG_FORMAT_RGB, _GRAY or _RGBA.
void write_png(const std::string& path, const std::vector<std::uint8_t>& pixels, std::uint32_t format,
               std::uint32_t width = 96, std::uint32_t height = 96) {
    png_image image{};
    image.version = PNG_IMAGE_VERSION;
    image.width = width;
    image.height = height;
    image.format = format;
    if (!png_image_write_to_file(&image, path.c_str(), 0, pixels.data(), 0, nullptr)) {
        throw std::runtime_error("test could not write " + path + ": " + image.message);
    }
}

std::vector<std::string> argv_of(std::initializer_list<const char*> items) { return {items.begin(), items.end()}; }

}  // namespace

TEST_CASE(args_defaults_and_values) {
    const auto o = pcam::parse_args(pcam::Tool::Infer, argv_of({"--engine", "m.plan", "a.bin", "b.png"}));
    CHECK_EQ(o.engine, "m.plan");
    CHECK_EQ(o.sidecar, "m.plan.json");
    CHECK_EQ(o.inputs.size(), 2u);
    CHECK_EQ(o.batch_size, 0);
    CHECK(o.format == pcam::OutputFormat::Csv);
    CHECK_EQ(o.output, "");

    const auto p = pcam::parse_args(pcam::Tool::Infer,
                                    argv_of({"--engine=m.plan", "--sidecar", "s.json", "--batch-size", "32",
                                             "--format", "json", "--output", "out.json", "--warmup=0", "--device",
                                             "1", "--quiet", "--", "--odd-name.bin"}));
    CHECK_EQ(p.sidecar, "s.json");
    CHECK_EQ(p.batch_size, 32);
    CHECK(p.format == pcam::OutputFormat::Json);
    CHECK_EQ(p.output, "out.json");
    CHECK_EQ(p.warmup, 0);
    CHECK_EQ(p.device, 1);
    CHECK(p.quiet);
    CHECK_EQ(p.inputs.size(), 1u);
    CHECK_EQ(p.inputs[0], "--odd-name.bin");

    TempDir dir;
    const std::string list = dir.file("list.txt");
    std::ofstream(list) << "# patches\nx.bin\n\ny.png  \r\n";
    const auto q = pcam::parse_args(pcam::Tool::Preprocess,
                                    argv_of({"--sidecar", "s.json", "--output", "t.bin", "--input-list",
                                             list.c_str(), "z.bin"}));
    CHECK_EQ(q.inputs.size(), 3u);
    CHECK_EQ(q.inputs[0], "x.bin");
    CHECK_EQ(q.inputs[1], "y.png");
    CHECK_EQ(q.inputs[2], "z.bin");
    CHECK_EQ(q.output, "t.bin");
    CHECK(pcam::parse_args(pcam::Tool::Infer, argv_of({"--help"})).help);
    CHECK(pcam::usage(pcam::Tool::Infer).find("--engine") != std::string::npos);
}

TEST_CASE(args_errors) {
    using pcam::Tool;
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Infer, argv_of({"a.bin"})), "--engine");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Infer, argv_of({"--engine", "m.plan"})), "no patch files");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Infer, argv_of({"--engine", "m.plan", "--bogus", "a.bin"})),
                      "unknown option", "--bogus");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Infer, argv_of({"--engine", "m.plan", "--batch-size", "0", "a.bin"})),
                      "--batch-size", "'0'");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Infer, argv_of({"--engine", "m.plan", "--batch-size", "8x", "a"})),
                      "'8x'");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Infer, argv_of({"--engine", "m.plan", "--format", "xml", "a.bin"})),
                      "--format", "'xml'");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Infer, argv_of({"--engine"})), "expects a value");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Preprocess, argv_of({"--sidecar", "s.json", "a.bin"})), "--output");
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Preprocess, argv_of({"--output", "t.bin", "a.bin"})), "--sidecar");
    // Options of the other tool are refused.
    CHECK_THROWS_WITH(pcam::parse_args(Tool::Preprocess, argv_of({"--sidecar", "s", "--output", "t", "--warmup",
                                                                  "1", "a.bin"})),
                      "unknown option", "--warmup");
    CHECK_THROWS_WITH(pcam::read_input_list("/nonexistent/list.txt"), "/nonexistent/list.txt");
}

TEST_CASE(sidecar_valid) {
    json doc = sidecar_json();
    doc["extra_field_from_a_newer_writer"] = 1;
    const pcam::Sidecar s = parse(doc);
    CHECK_EQ(s.source, "model.plan.json");
    CHECK_EQ(s.model, "inception_v4_pcam");
    CHECK_EQ(s.precision, "fp16");
    CHECK_EQ(s.input.name, "input");
    CHECK_EQ(s.output.name, "logits");
    CHECK_EQ(s.activation, "softmax");
    CHECK(!s.baked_in);
    CHECK_EQ(s.profile_min, 1);
    CHECK_EQ(s.profile_opt, 64);
    CHECK_EQ(s.profile_max, 256);
    CHECK_EQ(s.mean[1], 0.5384);
    CHECK_EQ(s.std[2], 0.2129);
    CHECK_EQ(s.num_classes(), 2u);
    CHECK_EQ(s.label_names[1], "metastatic");
    CHECK(!s.sha256_checkpoint.has_value());
    CHECK_EQ(s.sha256_plan, std::string(64, 'b'));
    CHECK_EQ(pcam::default_sidecar_path("dir/m.plan"), "dir/m.plan.json");

    doc["sha256"]["checkpoint"] = std::string(64, 'c');
    CHECK_EQ(parse(doc).sha256_checkpoint.value_or(""), std::string(64, 'c'));

    TempDir dir;
    const std::string path = dir.file("m.plan.json");
    std::ofstream(path) << sidecar_json().dump(2);
    CHECK_EQ(pcam::load_sidecar(path).source, path);
    CHECK_THROWS_WITH(pcam::load_sidecar(dir.file("missing.plan.json")), "missing.plan.json", "does not exist");
}

TEST_CASE(sidecar_baked_in) {
    const pcam::Sidecar s = parse(sidecar_json(true));
    CHECK(s.baked_in);
    CHECK_EQ(s.input.dtype, "uint8");
    CHECK_EQ(s.input.layout, "NHWC");
    CHECK_EQ(s.input.name, "patches");
    // A float NCHW input contradicts baked_in = true, and the other way round.
    json wrong = sidecar_json(true);
    wrong["input"] = sidecar_json(false)["input"];
    CHECK_THROWS_WITH(parse(wrong), "input.shape", "[-1, 3, 96, 96]", "[-1, 96, 96, 3]", "baked_in=true");
    json wrong2 = sidecar_json(false);
    wrong2["input"]["dtype"] = "uint8";
    CHECK_THROWS_WITH(parse(wrong2), "input.dtype", "'uint8'", "'float32'", "baked_in=false");
}

TEST_CASE(sidecar_errors) {
    struct Case {
        std::function<void(json&)> edit;
        std::vector<std::string> fragments;
    };
    const std::vector<Case> cases = {
        {[](json& d) { d.erase("tensorrt_version"); }, {"model.plan.json", "missing field 'tensorrt_version'"}},
        {[](json& d) { d["profile"].erase("max"); }, {"missing field 'profile.max'", "integer"}},
        {[](json& d) { d["profile"]["max"] = "256"; }, {"'profile.max'", "a string", "\"256\"", "an integer"}},
        {[](json& d) { d["format"] = "something-else/2"; }, {"'format'", "something-else/2", "engine/1"}},
        {[](json& d) { d["precision"] = "int8"; }, {"'precision'", "'int8'", "'fp16'", "'fp32'"}},
        {[](json& d) { d["tensorrt_version"] = "eleven"; }, {"'tensorrt_version'", "'eleven'"}},
        {[](json& d) { d["gpu"]["compute_capability"] = 9.0; }, {"'gpu.compute_capability'", "a number"}},
        {[](json& d) { d["gpu"]["compute_capability"] = "sm90"; }, {"'gpu.compute_capability'", "'sm90'"}},
        {[](json& d) { d["input"]["shape"] = {-1, 3, 224, 224}; }, {"'input.shape'", "[-1, 3, 224, 224]"}},
        {[](json& d) { d["input"]["layout"] = "NHWC"; }, {"'input.layout'", "'NHWC'", "'NCHW'"}},
        {[](json& d) { d["input"]["name"] = ""; }, {"'input.name'", "empty"}},
        {[](json& d) { d["output"]["name"] = "input"; }, {"'output.name'", "same as input.name"}},
        {[](json& d) { d["output"]["shape"] = {-1}; }, {"'output.shape'", "[-1]"}},
        {[](json& d) { d["output"]["activation"] = "sigmoid"; }, {"'output.activation'", "'sigmoid'"}},
        {[](json& d) { d["output"]["dtype"] = "uint8"; }, {"'output.dtype'", "'uint8'", "'float32'"}},
        {[](json& d) { d["profile"]["min"] = 128; }, {"'profile'", "min=128", "opt=64", "1 <= min <= opt <= max"}},
        {[](json& d) { d["profile"]["min"] = 0; }, {"'profile'", "min=0"}},
        {[](json& d) { d["preprocessing"]["mean"] = {0.5, 0.5}; }, {"'preprocessing.mean'", "2 values", "3"}},
        {[](json& d) { d["preprocessing"]["std"][1] = 0.0; }, {"'preprocessing.std'", "positive"}},
        {[](json& d) { d["preprocessing"]["std"][0] = "x"; }, {"'preprocessing.std'", "3 finite numbers"}},
        {[](json& d) { d["preprocessing"]["scale"] = -1; }, {"'preprocessing.scale'", "expected 255"}},
        {[](json& d) { d["preprocessing"]["raw_layout"] = "NCHW"; }, {"'preprocessing.raw_layout'", "'NCHW'"}},
        {[](json& d) { d["preprocessing"]["baked_in"] = "no"; }, {"'preprocessing.baked_in'", "true or false"}},
        {[](json& d) { d["label_names"] = {"normal"}; }, {"'label_names'", "1 names", "expected 2"}},
        {[](json& d) { d["label_names"] = {"normal", 1}; }, {"'label_names'", "list of strings"}},
        {[](json& d) { d["sha256"]["plan"] = "abc"; }, {"'sha256.plan'", "'abc'", "64"}},
        {[](json& d) { d["sha256"]["checkpoint"] = 5; }, {"'sha256.checkpoint'", "string or null"}},
        {[](json& d) { d["gpu"] = "H100"; }, {"'gpu'", "a string", "an object"}},
    };
    for (const Case& c : cases) {
        json doc = sidecar_json();
        c.edit(doc);
        const std::vector<std::string>& f = c.fragments;
        CHECK_THROWS_WITH(parse(doc), f.begin(), f.end());
    }
    CHECK_THROWS_WITH(pcam::parse_sidecar("{\"format\": ", "broken.json"), "broken.json", "not valid JSON");
    CHECK_THROWS_WITH(pcam::parse_sidecar("[1, 2]", "list.json"), "list.json", "JSON object", "an array");

    pcam::Sidecar s = parse(sidecar_json());
    CHECK_THROWS_WITH(pcam::check_plan_sha256(s, "m.plan", std::string(64, 'c')), "'m.plan'",
                      std::string(64, 'c'), std::string(64, 'b'), "truncated");
    pcam::check_plan_sha256(s, "m.plan", std::string(64, 'b'));
}

TEST_CASE(tensorrt_version_check) {
    const pcam::Sidecar s = parse(sidecar_json());  // built with 11.4.0.106
    pcam::check_tensorrt_version(s, 110400);
    CHECK_THROWS_WITH(pcam::check_tensorrt_version(s, 110500), "11.4.0.106", "TensorRT 11.5.0", "rebuild");
    CHECK_THROWS_WITH(pcam::check_tensorrt_version(s, 110401), "TensorRT 11.4.1");
    CHECK_THROWS_WITH(pcam::check_tensorrt_version(s, 100800), "TensorRT 10.8.0");
    json doc = sidecar_json();
    doc["tensorrt_version"] = "10.13.3";
    pcam::check_tensorrt_version(parse(doc), 101303);
    CHECK_THROWS_WITH(pcam::check_tensorrt_version(parse(doc), 110400), "10.13.3", "TensorRT 11.4.0");
}

TEST_CASE(gpu_check) {
    const pcam::Sidecar s = parse(sidecar_json());  // NVIDIA H100 80GB HBM3, 9.0
    std::ostringstream warnings;
    pcam::check_gpu(s, "NVIDIA H100 80GB HBM3", 9, 0, warnings);
    CHECK(warnings.str().empty());
    pcam::check_gpu(s, "NVIDIA H100 PCIe", 9, 0, warnings);
    CHECK(warnings.str().find("NVIDIA H100 PCIe") != std::string::npos);
    CHECK_THROWS_WITH(pcam::check_gpu(s, "NVIDIA A100-SXM4-40GB", 8, 0, warnings), "compute capability 9.0",
                      "NVIDIA A100-SXM4-40GB", "compute capability 8.0");
}

// ---- the fixtures shared with the Python tests (tests/golden/sidecar/manifest.json) ------------------------------

json fixture_manifest() {
    const std::string path = std::string(PCAM_SIDECAR_FIXTURES) + "/manifest.json";
    std::ifstream in(path);
    if (!in) {
        throw std::runtime_error("cannot read " + path + " (configure with -DPCAM_SIDECAR_FIXTURES=<dir>)");
    }
    return json::parse(in);
}

std::string fixture_path(const json& name) { return std::string(PCAM_SIDECAR_FIXTURES) + "/" + name.get<std::string>(); }

TEST_CASE(sidecar_fixtures) {
    const json manifest = fixture_manifest();
    CHECK(manifest.at("parse").size() >= 10);
    for (const json& entry : manifest.at("parse")) {
        const std::string path = fixture_path(entry.at("file"));
        if (entry.at("verdict") == "accept") {
            try {
                const pcam::Sidecar s = pcam::load_sidecar(path);
                CHECK_EQ(s.profile_max, 256);
                CHECK_EQ(s.num_classes(), 2u);
            } catch (const pcam::Error& error) {
                testing::fail(__FILE__, __LINE__, path + " should be accepted: " + error.what());
            }
        } else {
            CHECK_EQ(entry.at("verdict").get<std::string>(), "refuse");
            std::vector<std::string> fragments = entry.at("message").get<std::vector<std::string>>();
            fragments.push_back(path);
            CHECK_THROWS_WITH(pcam::load_sidecar(path), fragments.begin(), fragments.end());
        }
    }
}

TEST_CASE(compatibility_fixtures) {
    const json manifest = fixture_manifest();
    for (const json& entry : manifest.at("compatibility")) {
        const pcam::Sidecar s = pcam::load_sidecar(fixture_path(entry.at("sidecar")));
        int version[3] = {0, 0, 0};
        std::istringstream release(entry.at("tensorrt").get<std::string>());
        char dot = 0;
        release >> version[0] >> dot >> version[1] >> dot >> version[2];
        const std::int32_t library = (version[0] * 100 + version[1]) * 100 + version[2];
        const std::string name = entry.at("gpu").at("name").get<std::string>();
        const std::string capability = entry.at("gpu").at("compute_capability").get<std::string>();
        const int cc_major = std::stoi(capability.substr(0, capability.find('.')));
        const int cc_minor = std::stoi(capability.substr(capability.find('.') + 1));
        std::ostringstream warnings;
        const auto check = [&]() {
            pcam::check_tensorrt_version(s, library);
            pcam::check_gpu(s, name, cc_major, cc_minor, warnings);
        };
        const std::string verdict = entry.at("verdict").get<std::string>();
        const std::vector<std::string> fragments = entry.at("message").get<std::vector<std::string>>();
        if (verdict == "refuse") {
            CHECK_THROWS_WITH(check(), fragments.begin(), fragments.end());
            continue;
        }
        check();
        CHECK_EQ(warnings.str().empty(), verdict == "accept");
        for (const std::string& fragment : fragments) {
            if (warnings.str().find(fragment) == std::string::npos) {
                testing::fail(__FILE__, __LINE__, "warning '" + warnings.str() + "' lacks '" + fragment + "'");
            }
        }
    }
}

TEST_CASE(sha256_vectors) {
    // FIPS 180-4 examples.
    CHECK_EQ(pcam::sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK_EQ(pcam::sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    CHECK_EQ(pcam::sha256_hex(two_blocks.data(), two_blocks.size()),
             "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    // A file hashes as its bytes do, across the reader's chunk boundaries.
    TempDir dir;
    const std::string million_a(1000000, 'a');
    write_bytes(dir.file("a.bin"), million_a.data(), million_a.size());
    CHECK_EQ(pcam::sha256_file(dir.file("a.bin")), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    CHECK_THROWS_WITH(pcam::sha256_file(dir.file("none.plan")), "none.plan");
}

TEST_CASE(atomic_write) {
    TempDir dir;
    const std::string path = dir.file("out.csv");
    pcam::atomic_write(path, [](std::ostream& out) { out << "first\n"; });
    pcam::atomic_write(path, [](std::ostream& out) { out << "second\n"; });
    const std::vector<char> bytes = pcam::read_file_bytes(path);
    CHECK_EQ(std::string(bytes.begin(), bytes.end()), "second\n");
    // A failure half-way leaves the previous file and no temporary behind.
    bool threw = false;
    try {
        pcam::atomic_write(path, [](std::ostream& out) {
            out << "partial";
            throw pcam::Error("boom");
        });
    } catch (const pcam::Error&) {
        threw = true;
    }
    CHECK(threw);
    const std::vector<char> after = pcam::read_file_bytes(path);
    CHECK_EQ(std::string(after.begin(), after.end()), "second\n");
    CHECK_EQ(dir.entries(), 1u);
    CHECK_THROWS_WITH(pcam::atomic_write(dir.file("no/such/dir/out.csv"), [](std::ostream&) {}), "no/such/dir");
}

TEST_CASE(raw_patches) {
    TempDir dir;
    const auto a = random_patches(3, 1);
    const auto b = random_patches(2, 2);
    write_bytes(dir.file("a.bin"), a.data(), a.size());
    write_bytes(dir.file("b.RAW"), b.data(), b.size());
    CHECK_EQ(pcam::raw_patch_count(dir.file("a.bin")), 3u);
    const pcam::PatchReader reader({dir.file("a.bin"), dir.file("b.RAW")});
    CHECK_EQ(reader.size(), 5u);
    const auto where = reader.locate(4);
    CHECK_EQ(*where.file, dir.file("b.RAW"));
    CHECK_EQ(where.index, 1u);
    // A read spanning both files.
    std::vector<std::uint8_t> got(3 * pcam::kPatchBytes);
    reader.read(2, 3, got.data());
    CHECK(std::equal(a.begin() + 2 * pcam::kPatchBytes, a.end(), got.begin()));
    CHECK(std::equal(b.begin(), b.end(), got.begin() + pcam::kPatchBytes));
    CHECK_THROWS_WITH(reader.read(4, 2, got.data()), "out of range");
}

TEST_CASE(png_patches) {
    TempDir dir;
    const auto rgb = random_patches(1, 3);
    write_png(dir.file("rgb.png"), rgb, PNG_FORMAT_RGB);
    CHECK(pcam::read_png_patch(dir.file("rgb.png")) == rgb);

    std::vector<std::uint8_t> gray(96 * 96);
    for (std::size_t i = 0; i < gray.size(); ++i) {
        gray[i] = static_cast<std::uint8_t>((i * 7) % 256);
    }
    write_png(dir.file("gray.png"), gray, PNG_FORMAT_GRAY);
    const auto expanded = pcam::read_png_patch(dir.file("gray.png"));
    bool replicated = expanded.size() == pcam::kPatchBytes;
    for (std::size_t i = 0; replicated && i < gray.size(); ++i) {
        replicated = expanded[3 * i] == gray[i] && expanded[3 * i + 1] == gray[i] && expanded[3 * i + 2] == gray[i];
    }
    CHECK(replicated);

    std::vector<std::uint8_t> rgba(96 * 96 * 4);
    std::vector<std::uint8_t> rgb_of_rgba(pcam::kPatchBytes);
    for (std::size_t i = 0; i < 96 * 96; ++i) {
        for (std::size_t c = 0; c < 4; ++c) {
            rgba[4 * i + c] = static_cast<std::uint8_t>((i * (c + 3)) % 256);
        }
        std::copy_n(&rgba[4 * i], 3, &rgb_of_rgba[3 * i]);
    }
    write_png(dir.file("rgba.png"), rgba, PNG_FORMAT_RGBA);
    CHECK(pcam::read_png_patch(dir.file("rgba.png")) == rgb_of_rgba);

    // PNG and raw files mix in one reader, in the order given.
    write_bytes(dir.file("one.bin"), rgb.data(), rgb.size());
    const pcam::PatchReader reader({dir.file("gray.png"), dir.file("one.bin"), dir.file("rgba.png")});
    CHECK_EQ(reader.size(), 3u);
    std::vector<std::uint8_t> all(3 * pcam::kPatchBytes);
    reader.read(0, 3, all.data());
    CHECK(std::equal(expanded.begin(), expanded.end(), all.begin()));
    CHECK(std::equal(rgb.begin(), rgb.end(), all.begin() + pcam::kPatchBytes));
    CHECK(std::equal(rgb_of_rgba.begin(), rgb_of_rgba.end(), all.begin() + 2 * pcam::kPatchBytes));
}

TEST_CASE(patch_errors) {
    TempDir dir;
    const auto one = random_patches(1, 4);
    write_bytes(dir.file("short.bin"), one.data(), one.size() - 5);
    CHECK_THROWS_WITH(pcam::PatchReader({dir.file("short.bin")}), "short.bin", std::to_string(one.size() - 5),
                      "multiple of 27648");
    write_bytes(dir.file("empty.raw"), one.data(), 0);
    CHECK_THROWS_WITH(pcam::PatchReader({dir.file("empty.raw")}), "empty.raw", "holds 0 bytes");
    CHECK_THROWS_WITH(pcam::PatchReader({dir.file("missing.bin")}), "missing.bin", "does not exist");
    CHECK_THROWS_WITH(pcam::PatchReader({dir.file("missing.png")}), "missing.png", "does not exist");
    write_bytes(dir.file("patch.jpg"), one.data(), 10);
    CHECK_THROWS_WITH(pcam::PatchReader({dir.file("patch.jpg")}), "patch.jpg", "'.jpg'", ".png");

    const std::vector<std::uint8_t> big(128 * 64 * 3, 7);
    write_png(dir.file("big.png"), big, PNG_FORMAT_RGB, 128, 64);
    CHECK_THROWS_WITH(pcam::PatchReader({dir.file("big.png")}), "big.png", "128x64", "expected 96x96");
    write_bytes(dir.file("fake.png"), one.data(), 100);
    CHECK_THROWS_WITH(pcam::PatchReader({dir.file("fake.png")}), "fake.png", "cannot be decoded");
    // A PNG cut short after a valid header fails when its pixels are read, with the file named.
    write_png(dir.file("whole.png"), one, PNG_FORMAT_RGB);
    const std::vector<char> whole = pcam::read_file_bytes(dir.file("whole.png"));
    write_bytes(dir.file("cut.png"), whole.data(), whole.size() / 2);
    const pcam::PatchReader reader({dir.file("cut.png")});
    std::vector<std::uint8_t> out(pcam::kPatchBytes);
    CHECK_THROWS_WITH(reader.read(0, 1, out.data()), "cut.png", "cannot be decoded");
}

TEST_CASE(normalise_matches_formula) {
    const std::array<double, 3> mean = {0.7008, 0.5384, 0.6916};
    const std::array<double, 3> std = {0.2350, 0.2774, 0.2129};
    const pcam::Normaliser normalise(mean, std);
    const std::size_t n = 2;
    const auto patches = random_patches(n, 5);
    std::vector<float> out(n * pcam::kPatchBytes);
    normalise(patches.data(), n, out.data());
    double worst = 0.0;
    double spread = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        for (std::size_t y = 0; y < 96; ++y) {
            for (std::size_t x = 0; x < 96; ++x) {
                for (std::size_t c = 0; c < 3; ++c) {
                    const double pixel = patches[((i * 96 + y) * 96 + x) * 3 + c];
                    const double expected = (pixel / 255.0 - mean[c]) / std[c];
                    const double got = out[((i * 3 + c) * 96 + y) * 96 + x];
                    worst = std::max(worst, std::fabs(got - expected));
                    spread = std::max(spread, std::fabs(expected));
                }
            }
        }
    }
    CHECK(worst < 1e-6);
    CHECK(spread > 1.0);  // the values checked are not all alike
}

TEST_CASE(baked_in_passthrough) {
    TempDir dir;
    const auto patches = random_patches(3, 6);
    write_bytes(dir.file("p.bin"), patches.data(), patches.size());
    const pcam::Sidecar s = parse(sidecar_json(true));
    const pcam::PatchReader reader({dir.file("p.bin")});
    pcam::InputPipeline pipeline(s, reader, 2);
    CHECK(!pipeline.float_input());
    CHECK_EQ(pipeline.bytes_per_patch(), pcam::kPatchBytes);
    std::vector<std::uint8_t> buffer(pipeline.max_batch_bytes());
    std::vector<std::uint8_t> joined;
    for (const pcam::Batch& batch : pipeline.batches()) {
        pipeline.fill(batch, buffer.data());
        joined.insert(joined.end(), buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(batch.count * pcam::kPatchBytes));
    }
    CHECK(joined == patches);
}

TEST_CASE(batch_plan) {
    const auto plan = pcam::plan_batches(10, 4, 1);
    CHECK_EQ(plan.size(), 3u);
    CHECK_EQ(plan[0].start, 0u);
    CHECK_EQ(plan[1].start, 4u);
    CHECK_EQ(plan[2].start, 8u);
    CHECK_EQ(plan[2].count, 2u);
    CHECK_EQ(plan[2].padded, 2u);
    const auto padded = pcam::plan_batches(9, 4, 3);  // last batch of 1 is padded to the profile's min
    CHECK_EQ(padded.back().count, 1u);
    CHECK_EQ(padded.back().padded, 3u);
    CHECK_EQ(padded.front().padded, 4u);
    CHECK(pcam::plan_batches(0, 4, 1).empty());
    CHECK_EQ(pcam::plan_batches(8, 4, 1).size(), 2u);
    CHECK_THROWS_WITH(pcam::plan_batches(8, 2, 3), "below the profile's min 3");

    const pcam::Sidecar s = parse(sidecar_json());  // profile 1..256
    CHECK_EQ(pcam::resolve_batch_size(0, s), 256u);
    CHECK_EQ(pcam::resolve_batch_size(17, s), 17u);
    CHECK_THROWS_WITH(pcam::resolve_batch_size(512, s), "512", "[1, 256]", "model.plan.json");
}

TEST_CASE(pipeline_fill) {
    TempDir dir;
    const std::size_t n = 5;
    const auto patches = random_patches(n, 7);
    write_bytes(dir.file("p.bin"), patches.data(), patches.size());
    json doc = sidecar_json();
    doc["profile"] = {{"min", 3}, {"opt", 4}, {"max", 4}};
    doc["preprocessing"]["mean"] = {0.25, 0.5, 0.75};  // the sidecar's values are the ones used
    doc["preprocessing"]["std"] = {0.5, 0.25, 0.125};
    const pcam::Sidecar s = parse(doc);
    const pcam::PatchReader reader({dir.file("p.bin")});
    pcam::InputPipeline pipeline(s, reader, pcam::resolve_batch_size(0, s));
    CHECK_EQ(pipeline.batches().size(), 2u);
    CHECK_EQ(pipeline.bytes_per_patch(), pcam::kPatchBytes * sizeof(float));
    CHECK_EQ(pipeline.max_batch_bytes(), 4 * pcam::kPatchBytes * sizeof(float));

    const pcam::Normaliser normalise(s.mean, s.std);
    std::vector<float> expected(n * pcam::kPatchBytes);
    normalise(patches.data(), n, expected.data());
    std::vector<float> buffer(pipeline.max_batch_bytes() / sizeof(float), -99.0f);
    const pcam::Batch& last = pipeline.batches()[1];  // 1 real patch padded to 3 rows
    CHECK_EQ(last.padded, 3u);
    pipeline.fill(last, buffer.data());
    CHECK(std::equal(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(pcam::kPatchBytes),
                     expected.begin() + static_cast<std::ptrdiff_t>(4 * pcam::kPatchBytes)));
    const auto padding = buffer.begin() + static_cast<std::ptrdiff_t>(pcam::kPatchBytes);
    CHECK(std::all_of(padding, padding + static_cast<std::ptrdiff_t>(2 * pcam::kPatchBytes),
                      [](float v) { return v == 0.0f; }));
    CHECK_EQ(buffer[3 * pcam::kPatchBytes], -99.0f);  // nothing written past the padded rows
    CHECK_NEAR(expected[0], (patches[0] / 255.0 - 0.25) / 0.5, 1e-6);
}

TEST_CASE(softmax) {
    const std::vector<float> logits = {2.0f, -1.0f, 1000.0f, 0.0f, -3.5f, -3.5f, 0.1f, 0.2f};
    std::vector<float> probs(logits.size());
    pcam::softmax_rows(logits.data(), 4, 2, probs.data());
    for (std::size_t r = 0; r < 4; ++r) {
        const double d = static_cast<double>(logits[2 * r + 1]) - logits[2 * r];
        CHECK_NEAR(probs[2 * r + 1], 1.0 / (1.0 + std::exp(-d)), 1e-7);
        CHECK_NEAR(probs[2 * r] + probs[2 * r + 1], 1.0, 1e-6);
        CHECK(std::isfinite(probs[2 * r]));
    }
    CHECK_EQ(probs[2], 1.0f);  // no overflow with large logits
    const std::vector<float> three = {1.0f, 2.0f, 3.0f};
    std::vector<float> p3(3);
    pcam::softmax_rows(three.data(), 1, 3, p3.data());
    const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
    CHECK_NEAR(p3[0], std::exp(1.0) / z, 1e-7);
    CHECK_NEAR(p3[2], std::exp(3.0) / z, 1e-7);
}

TEST_CASE(csv_output) {
    const std::vector<pcam::Prediction> predictions = {
        {"a.bin", 0, {0.25f, 0.75f}},
        {"dir/we,ird \"name\".png", 0, {0.9f, 0.1f}},
    };
    std::ostringstream out;
    pcam::write_csv(out, {"normal", "metastatic"}, predictions);
    const std::string expected_header = "file,index,prob_normal,prob_metastatic,prediction\n";
    const std::string text = out.str();
    CHECK_EQ(text.substr(0, expected_header.size()), expected_header);
    CHECK(text.find("a.bin,0,0.25,0.75,metastatic\n") != std::string::npos);
    CHECK(text.find("\"dir/we,ird \"\"name\"\".png\",0,") != std::string::npos);
    CHECK(text.find(",normal\n") != std::string::npos);
    // Values round-trip float32 exactly.
    std::ostringstream precise;
    pcam::write_csv(precise, {"normal", "metastatic"}, {{"x.bin", 3, {0.1f, 0.9f}}});
    const std::string row = precise.str().substr(precise.str().find('\n') + 1);
    CHECK_EQ(std::stof(row.substr(row.find(",0.") + 1)), 0.1f);
    std::ostringstream bad;
    CHECK_THROWS_WITH(pcam::write_csv(bad, {"normal", "metastatic"}, {{"x.bin", 0, {1.0f}}}), "x.bin",
                      "1 probabilities", "expected 2");
}

TEST_CASE(json_output) {
    const pcam::Sidecar s = parse(sidecar_json());
    pcam::Throughput t;
    t.patches = 3;
    t.batches = 1;
    t.total_seconds = 0.5;
    t.inference_seconds = 0.25;
    const std::vector<pcam::Prediction> predictions = {
        {"a.bin", 0, {0.25f, 0.75f}}, {"a.bin", 1, {0.6f, 0.4f}}, {"b.png", 0, {0.5f, 0.5f}}};
    std::ostringstream out;
    pcam::write_json(out, s, predictions, t);
    const json doc = json::parse(out.str());
    CHECK_EQ(doc["format"].get<std::string>(), pcam::kPredictionsFormat);
    CHECK_EQ(doc["model"].get<std::string>(), "inception_v4_pcam");
    CHECK_EQ(doc["precision"].get<std::string>(), "fp16");
    CHECK_EQ(doc["label_names"][1].get<std::string>(), "metastatic");
    CHECK_EQ(doc["predictions"].size(), 3u);
    CHECK_EQ(doc["predictions"][1]["index"].get<int>(), 1);
    CHECK_EQ(doc["predictions"][1]["prediction"].get<std::string>(), "normal");
    CHECK_EQ(doc["predictions"][0]["prediction"].get<std::string>(), "metastatic");
    CHECK_EQ(doc["predictions"][0]["probabilities"][1].get<float>(), 0.75f);
    CHECK_EQ(doc["predictions"][2]["file"].get<std::string>(), "b.png");
    CHECK_EQ(doc["throughput"]["patches_per_second"].get<double>(), 6.0);
    CHECK_EQ(doc["throughput"]["inference_patches_per_second"].get<double>(), 12.0);
}

TEST_CASE(throughput) {
    pcam::Throughput t;
    CHECK_EQ(t.patches_per_second(), 0.0);  // no division by zero
    t.patches = 1000;
    t.batches = 4;
    t.total_seconds = 2.0;
    const std::string without = pcam::throughput_summary(t, 256);
    CHECK(without.find("1000 patches in 4 batches (max 256)") != std::string::npos);
    CHECK(without.find("500.0 patches/s") != std::string::npos);
    CHECK(without.find("inference") == std::string::npos);
    t.inference_seconds = 0.5;
    const std::string with = pcam::throughput_summary(t, 256);
    CHECK(with.find("2000.0 patches/s inference") != std::string::npos);
    CHECK_EQ(pcam::argmax({0.1f, 0.7f, 0.2f}), 1u);
}

int main(int argc, char** argv) { return testing::main(argc, argv); }
