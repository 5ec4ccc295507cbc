// The JSON sidecar written beside every engine plan (`<plan>.json`, format "timm-inception-pcam-engine/1").
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace pcam {

inline constexpr const char* kSidecarFormat = "timm-inception-pcam-engine/1";
inline constexpr int kPatchHeight = 96;
inline constexpr int kPatchWidth = 96;
inline constexpr int kPatchChannels = 3;
inline constexpr std::size_t kPatchBytes = std::size_t{kPatchHeight} * kPatchWidth * kPatchChannels;

struct TensorSpec {
    std::string name;
    std::vector<std::int64_t> shape;  // -1 marks the dynamic batch dimension
    std::string dtype;                // "float32" or "uint8"
    std::string layout;               // inputs only: "NCHW" or "NHWC"
};

struct Sidecar {
    std::string source;  // the file it was read from, for messages
    std::string model;
    std::string tensorrt_version;
    std::string gpu_name;
    std::string compute_capability;  // "major.minor"
    std::string precision;           // "fp16" or "fp32"
    bool version_compatible = false; // built with BuilderFlag::kVERSION_COMPATIBLE (optional field, default false)
    TensorSpec input;
    TensorSpec output;
    std::string activation;  // "softmax": outputs are logits; "none": outputs are probabilities already
    std::int64_t profile_min = 0;
    std::int64_t profile_opt = 0;
    std::int64_t profile_max = 0;
    bool baked_in = false;  // true: the engine takes raw uint8 NHWC patches and normalises them itself
    double scale = 255.0;
    std::array<double, 3> mean{};
    std::array<double, 3> std{};
    std::vector<std::string> label_names;
    std::optional<std::string> sha256_checkpoint;
    std::string sha256_onnx;
    std::string sha256_plan;

    std::size_t num_classes() const { return label_names.size(); }
};

// Parses and validates; every problem raises pcam::Error naming `source`, the field, the value and the expectation.
Sidecar parse_sidecar(const std::string& text, const std::string& source);
Sidecar load_sidecar(const std::string& path);

// The sidecar of a plan: `<plan>.json`.
std::string default_sidecar_path(const std::string& plan_path);

// Refuses a plan whose bytes do not hash to the sidecar's sha256.plan (truncated plan, sidecar of another plan).
void check_plan_sha256(const Sidecar& sidecar, const std::string& plan_path, const std::string& plan_sha256);

// `library_version` as returned by getInferLibVersion(): (major * 100 + minor) * 100 + patch. An ordinary plan only
// loads in the TensorRT release that built it (major, minor and patch match); a version-compatible plan in that
// release or a later one of the same major version. export/sidecar.py applies the same rule.
void check_tensorrt_version(const Sidecar& sidecar, std::int32_t library_version);

// Refuses a GPU of another compute capability; a different name with the same capability only warns on `warnings`
// (the same rule as export/sidecar.py).
void check_gpu(const Sidecar& sidecar, const std::string& gpu_name, int cc_major, int cc_minor,
               std::ostream& warnings);

}  // namespace pcam
