#include "pcam/sidecar.hpp"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <nlohmann/json.hpp>

#include "pcam/error.hpp"
#include "pcam/fileio.hpp"

namespace pcam {

namespace {

using nlohmann::json;

std::string type_name(const json& value) {
    if (value.is_number_integer()) {
        return "an integer";
    }
    if (value.is_number()) {
        return "a number";
    }
    const std::string name = value.type_name();
    return (name == "array" || name == "object") ? "an " + name : "a " + name;
}

std::string shown(const json& value) {
    std::string text = value.dump();
    return text.size() > 80 ? text.substr(0, 77) + "..." : text;
}

// Typed access to the fields of one JSON document, with messages naming the file and the dotted field path.
class Fields {
public:
    explicit Fields(std::string source) : source_(std::move(source)) {}

    [[noreturn]] void fail(const std::string& path, const std::string& message) const {
        throw Error(source_ + ": field '" + path + "' " + message);
    }

    const json& get(const json& object, const std::string& parent, const std::string& key,
                    const std::string& expected) const {
        const std::string path = parent.empty() ? key : parent + "." + key;
        if (!object.is_object()) {
            fail(parent, "is " + type_name(object) + " (" + shown(object) + "), expected an object");
        }
        const auto it = object.find(key);
        if (it == object.end()) {
            throw Error(source_ + ": missing field '" + path + "' (" + expected + ")");
        }
        return *it;
    }

    const json& object(const json& parent, const std::string& path, const std::string& key) const {
        const json& value = get(parent, path, key, "an object");
        if (!value.is_object()) {
            fail(join(path, key), "is " + type_name(value) + " (" + shown(value) + "), expected an object");
        }
        return value;
    }

    std::string string(const json& parent, const std::string& path, const std::string& key) const {
        const json& value = get(parent, path, key, "a string");
        if (!value.is_string()) {
            fail(join(path, key), "is " + type_name(value) + " (" + shown(value) + "), expected a string");
        }
        return value.get<std::string>();
    }

    std::optional<std::string> optional_string(const json& parent, const std::string& path,
                                               const std::string& key) const {
        const json& value = get(parent, path, key, "a string or null");
        if (value.is_null()) {
            return std::nullopt;
        }
        if (!value.is_string()) {
            fail(join(path, key), "is " + type_name(value) + " (" + shown(value) + "), expected a string or null");
        }
        return value.get<std::string>();
    }

    std::string choice(const json& parent, const std::string& path, const std::string& key,
                       const std::vector<std::string>& allowed) const {
        std::string value = string(parent, path, key);
        for (const auto& option : allowed) {
            if (value == option) {
                return value;
            }
        }
        std::string options;
        for (const auto& option : allowed) {
            options += (options.empty() ? "'" : ", '") + option + "'";
        }
        fail(join(path, key), "is '" + value + "', expected one of " + options);
    }

    std::int64_t integer(const json& parent, const std::string& path, const std::string& key) const {
        const json& value = get(parent, path, key, "an integer");
        if (!value.is_number_integer()) {
            fail(join(path, key), "is " + type_name(value) + " (" + shown(value) + "), expected an integer");
        }
        return value.get<std::int64_t>();
    }

    double number(const json& parent, const std::string& path, const std::string& key) const {
        const json& value = get(parent, path, key, "a number");
        if (!value.is_number()) {
            fail(join(path, key), "is " + type_name(value) + " (" + shown(value) + "), expected a number");
        }
        return value.get<double>();
    }

    bool boolean(const json& parent, const std::string& path, const std::string& key) const {
        const json& value = get(parent, path, key, "true or false");
        if (!value.is_boolean()) {
            fail(join(path, key), "is " + type_name(value) + " (" + shown(value) + "), expected true or false");
        }
        return value.get<bool>();
    }

    const json& array(const json& parent, const std::string& path, const std::string& key,
                      const std::string& expected) const {
        const json& value = get(parent, path, key, expected);
        if (!value.is_array()) {
            fail(join(path, key), "is " + type_name(value) + " (" + shown(value) + "), expected " + expected);
        }
        return value;
    }

    std::vector<std::int64_t> shape(const json& parent, const std::string& path, const std::string& key) const {
        const json& value = array(parent, path, key, "a list of integers");
        std::vector<std::int64_t> dims;
        for (const json& dim : value) {
            if (!dim.is_number_integer()) {
                fail(join(path, key), "is " + shown(value) + ", expected a list of integers");
            }
            dims.push_back(dim.get<std::int64_t>());
        }
        return dims;
    }

    std::array<double, 3> triple(const json& parent, const std::string& path, const std::string& key) const {
        const json& value = array(parent, path, key, "a list of 3 numbers (R, G, B)");
        if (value.size() != 3) {
            fail(join(path, key), "has " + std::to_string(value.size()) + " values (" + shown(value) +
                                      "), expected 3 (R, G, B)");
        }
        std::array<double, 3> out{};
        for (std::size_t i = 0; i < 3; ++i) {
            if (!value[i].is_number() || !std::isfinite(value[i].get<double>())) {
                fail(join(path, key), "is " + shown(value) + ", expected 3 finite numbers");
            }
            out[i] = value[i].get<double>();
        }
        return out;
    }

    static std::string join(const std::string& path, const std::string& key) {
        return path.empty() ? key : path + "." + key;
    }

private:
    std::string source_;
};

std::string shape_text(const std::vector<std::int64_t>& shape) {
    std::string text = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        text += (i ? ", " : "") + std::to_string(shape[i]);
    }
    return text + "]";
}

TensorSpec tensor_spec(const Fields& f, const json& root, const std::string& key, bool with_layout) {
    const json& node = f.object(root, "", key);
    TensorSpec spec;
    spec.name = f.string(node, key, "name");
    if (spec.name.empty()) {
        f.fail(key + ".name", "is empty, expected the engine's tensor name");
    }
    spec.shape = f.shape(node, key, "shape");
    spec.dtype = f.choice(node, key, "dtype", {"float32", "uint8"});
    if (with_layout) {
        spec.layout = f.choice(node, key, "layout", {"NCHW", "NHWC"});
    }
    return spec;
}

bool is_sha256(const std::string& value) {
    return value.size() == 64 && std::all_of(value.begin(), value.end(), [](char c) {
               return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
           });
}

// Splits "11.4.0.106" into its integer components; false unless it is 1+ dot-separated runs of digits.
bool split_version(const std::string& text, std::vector<int>& parts) {
    parts.clear();
    std::size_t start = 0;
    while (true) {
        const std::size_t dot = std::min(text.find('.', start), text.size());
        const std::string piece = text.substr(start, dot - start);
        if (piece.empty() || piece.size() > 6 ||
            !std::all_of(piece.begin(), piece.end(), [](char c) { return c >= '0' && c <= '9'; })) {
            return false;
        }
        parts.push_back(std::stoi(piece));
        if (dot == text.size()) {
            return true;
        }
        start = dot + 1;
    }
}

// "11.4.0.106" -> (11, 4, 0); false unless the text is at least three dot-separated integers.
bool parse_version(const std::string& text, int& major, int& minor, int& patch) {
    std::vector<int> parts;
    if (!split_version(text, parts) || parts.size() < 3) {
        return false;
    }
    major = parts[0];
    minor = parts[1];
    patch = parts[2];
    return true;
}

bool is_compute_capability(const std::string& text) {
    std::vector<int> parts;
    return split_version(text, parts) && parts.size() == 2;
}

}  // namespace

Sidecar parse_sidecar(const std::string& text, const std::string& source) {
    json root;
    try {
        root = json::parse(text);
    } catch (const json::exception& error) {  // syntax errors, and numbers that overflow a double
        throw Error(source + ": not valid JSON (" + error.what() + ")");
    }
    if (!root.is_object()) {
        throw Error(source + ": expected a JSON object at the top level, got " + type_name(root));
    }
    const Fields f(source);
    Sidecar s;
    s.source = source;

    const std::string format = f.string(root, "", "format");
    if (format != kSidecarFormat) {
        f.fail("format", "is '" + format + "', expected '" + std::string(kSidecarFormat) +
                             "' (a sidecar written by python -m export.trt)");
    }
    s.model = f.string(root, "", "model");
    s.tensorrt_version = f.string(root, "", "tensorrt_version");
    int major = 0;
    int minor = 0;
    int patch = 0;
    if (!parse_version(s.tensorrt_version, major, minor, patch)) {
        f.fail("tensorrt_version", "is '" + s.tensorrt_version + "', expected a version such as '11.4.0.106'");
    }
    const json& gpu = f.object(root, "", "gpu");
    s.gpu_name = f.string(gpu, "gpu", "name");
    s.compute_capability = f.string(gpu, "gpu", "compute_capability");
    if (!is_compute_capability(s.compute_capability)) {
        f.fail("gpu.compute_capability", "is '" + s.compute_capability + "', expected 'major.minor' such as '9.0'");
    }
    s.precision = f.choice(root, "", "precision", {"fp16", "fp32"});
    if (root.contains("version_compatible")) {
        s.version_compatible = f.boolean(root, "", "version_compatible");
    }

    const json& pre = f.object(root, "", "preprocessing");
    s.baked_in = f.boolean(pre, "preprocessing", "baked_in");
    f.choice(pre, "preprocessing", "raw_layout", {"NHWC"});
    f.choice(pre, "preprocessing", "raw_dtype", {"uint8"});
    s.scale = f.number(pre, "preprocessing", "scale");
    if (s.scale != 255.0) {
        f.fail("preprocessing.scale", "is " + std::to_string(s.scale) + ", expected 255.0");
    }
    s.mean = f.triple(pre, "preprocessing", "mean");
    s.std = f.triple(pre, "preprocessing", "std");
    for (double value : s.std) {
        if (!(value > 0.0)) {
            f.fail("preprocessing.std", "contains " + std::to_string(value) + ", expected positive values");
        }
    }

    s.input = tensor_spec(f, root, "input", true);
    const std::vector<std::int64_t> float_shape = {-1, kPatchChannels, kPatchHeight, kPatchWidth};
    const std::vector<std::int64_t> raw_shape = {-1, kPatchHeight, kPatchWidth, kPatchChannels};
    const std::vector<std::int64_t>& want_shape = s.baked_in ? raw_shape : float_shape;
    const std::string want_dtype = s.baked_in ? "uint8" : "float32";
    const std::string want_layout = s.baked_in ? "NHWC" : "NCHW";
    const std::string because = std::string(" for preprocessing.baked_in=") + (s.baked_in ? "true" : "false");
    if (s.input.shape != want_shape) {
        f.fail("input.shape", "is " + shape_text(s.input.shape) + ", expected " + shape_text(want_shape) + because);
    }
    if (s.input.dtype != want_dtype) {
        f.fail("input.dtype", "is '" + s.input.dtype + "', expected '" + want_dtype + "'" + because);
    }
    if (s.input.layout != want_layout) {
        f.fail("input.layout", "is '" + s.input.layout + "', expected '" + want_layout + "'" + because);
    }

    s.output = tensor_spec(f, root, "output", false);
    s.activation = f.choice(f.object(root, "", "output"), "output", "activation", {"softmax", "none"});
    if (s.output.dtype != "float32") {
        f.fail("output.dtype", "is '" + s.output.dtype + "', expected 'float32'");
    }
    if (s.output.shape.size() != 2 || s.output.shape[0] != -1 || s.output.shape[1] < 2) {
        f.fail("output.shape", "is " + shape_text(s.output.shape) + ", expected [-1, classes] with classes >= 2");
    }
    if (s.output.name == s.input.name) {
        f.fail("output.name", "is '" + s.output.name + "', the same as input.name");
    }

    const json& labels = f.array(root, "", "label_names", "a list of strings");
    for (const json& label : labels) {
        if (!label.is_string()) {
            f.fail("label_names", "is " + shown(labels) + ", expected a list of strings");
        }
        s.label_names.push_back(label.get<std::string>());
    }
    if (static_cast<std::int64_t>(s.label_names.size()) != s.output.shape[1]) {
        f.fail("label_names", "has " + std::to_string(s.label_names.size()) + " names (" + shown(labels) +
                                  "), expected " + std::to_string(s.output.shape[1]) + " to match output.shape");
    }

    const json& profile = f.object(root, "", "profile");
    s.profile_min = f.integer(profile, "profile", "min");
    s.profile_opt = f.integer(profile, "profile", "opt");
    s.profile_max = f.integer(profile, "profile", "max");
    if (!(1 <= s.profile_min && s.profile_min <= s.profile_opt && s.profile_opt <= s.profile_max)) {
        f.fail("profile", "is min=" + std::to_string(s.profile_min) + " opt=" + std::to_string(s.profile_opt) +
                              " max=" + std::to_string(s.profile_max) + ", expected 1 <= min <= opt <= max");
    }

    const json& sha = f.object(root, "", "sha256");
    s.sha256_checkpoint = f.optional_string(sha, "sha256", "checkpoint");
    s.sha256_onnx = f.string(sha, "sha256", "onnx");
    s.sha256_plan = f.string(sha, "sha256", "plan");
    for (const auto& [key, value] : {std::pair<std::string, std::string>{"onnx", s.sha256_onnx},
                                     std::pair<std::string, std::string>{"plan", s.sha256_plan}}) {
        if (!is_sha256(value)) {
            f.fail("sha256." + key, "is '" + value + "', expected 64 lowercase hexadecimal digits");
        }
    }
    if (s.sha256_checkpoint && !is_sha256(*s.sha256_checkpoint)) {
        f.fail("sha256.checkpoint", "is '" + *s.sha256_checkpoint + "', expected 64 lowercase hexadecimal digits");
    }
    return s;
}

Sidecar load_sidecar(const std::string& path) {
    const std::vector<char> bytes = read_file_bytes(path, "engine sidecar");
    return parse_sidecar(std::string(bytes.begin(), bytes.end()), path);
}

std::string default_sidecar_path(const std::string& plan_path) { return plan_path + ".json"; }

void check_plan_sha256(const Sidecar& sidecar, const std::string& plan_path, const std::string& plan_sha256) {
    if (plan_sha256 != sidecar.sha256_plan) {
        throw Error("plan '" + plan_path + "' has sha256 " + plan_sha256 + " but its sidecar '" + sidecar.source +
                    "' records " + sidecar.sha256_plan +
                    ": the plan is truncated or modified, or the sidecar belongs to another plan");
    }
}

void check_tensorrt_version(const Sidecar& sidecar, std::int32_t library_version) {
    int major = 0;
    int minor = 0;
    int patch = 0;
    if (!parse_version(sidecar.tensorrt_version, major, minor, patch)) {
        throw Error(sidecar.source + ": field 'tensorrt_version' is '" + sidecar.tensorrt_version +
                    "', expected a version such as '11.4.0.106'");
    }
    const int lib_major = library_version / 10000;
    const int lib_minor = (library_version / 100) % 100;
    const int lib_patch = library_version % 100;
    const std::string here =
        std::to_string(lib_major) + "." + std::to_string(lib_minor) + "." + std::to_string(lib_patch);
    const std::string rebuild = "; rebuild it on this machine with python -m export.trt";
    if (sidecar.version_compatible) {
        const bool older = std::make_tuple(lib_major, lib_minor, lib_patch) < std::make_tuple(major, minor, patch);
        if (lib_major != major || older) {
            throw Error(sidecar.source + ": version-compatible plan built with TensorRT " + sidecar.tensorrt_version +
                        ", this runtime links TensorRT " + here + "; it loads in TensorRT " + std::to_string(major) +
                        ".x from " + std::to_string(major) + "." + std::to_string(minor) + "." +
                        std::to_string(patch) + " on" + rebuild);
        }
    } else if (major != lib_major || minor != lib_minor || patch != lib_patch) {
        throw Error(sidecar.source + ": plan built with TensorRT " + sidecar.tensorrt_version +
                    ", this runtime links TensorRT " + here +
                    "; a plan only loads in the TensorRT release that built it" + rebuild);
    }
}

void check_gpu(const Sidecar& sidecar, const std::string& gpu_name, int cc_major, int cc_minor,
               std::ostream& warnings) {
    const std::string capability = std::to_string(cc_major) + "." + std::to_string(cc_minor);
    if (capability != sidecar.compute_capability) {
        throw Error("the plan was built for " + sidecar.gpu_name + " (compute capability " +
                    sidecar.compute_capability + ", " + sidecar.source + ") but this GPU is " + gpu_name +
                    " (compute capability " + capability + "); rebuild it on this GPU with python -m export.trt");
    }
    if (gpu_name != sidecar.gpu_name) {
        warnings << "warning: the plan was built on " << sidecar.gpu_name << ", running on " << gpu_name
                 << " (same compute capability " << capability << "); performance may differ\n";
    }
}

}  // namespace pcam
