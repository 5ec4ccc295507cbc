// Input preparation and output decoding around the engine: normalisation, batching, softmax.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "pcam/patches.hpp"
#include "pcam/sidecar.hpp"

namespace pcam {

// uint8 NHWC -> float32 NCHW as (x / scale - mean) / std, computed in float32 exactly as
// timm_inception_pcam.preprocess.preprocess_patches does: x * (1 / (scale * std)) - mean / std.
class Normaliser {
public:
    Normaliser(const std::array<double, 3>& mean, const std::array<double, 3>& std, double scale = 255.0);
    void operator()(const std::uint8_t* nhwc, std::size_t count, float* nchw) const;

private:
    std::array<float, 3> multiplier_{};
    std::array<float, 3> offset_{};
};

struct Batch {
    std::size_t start = 0;   // first patch
    std::size_t count = 0;   // real patches
    std::size_t padded = 0;  // rows sent to the engine (>= count: a last batch below the profile's min is padded)
};

// `requested` 0 means the profile's max; anything outside [profile min, profile max] raises.
std::size_t resolve_batch_size(int requested, const Sidecar& sidecar);
std::vector<Batch> plan_batches(std::size_t n, std::size_t batch_size, std::size_t profile_min);

// Numerically stable row-wise softmax (computed in double).
void softmax_rows(const float* logits, std::size_t rows, std::size_t cols, float* probs);

// Reads, preprocesses and pads batches into the engine's input layout and dtype, as the sidecar describes.
class InputPipeline {
public:
    InputPipeline(const Sidecar& sidecar, const PatchReader& reader, std::size_t batch_size);

    const std::vector<Batch>& batches() const { return batches_; }
    std::size_t batch_size() const { return batch_size_; }
    bool float_input() const { return !baked_in_; }
    std::size_t bytes_per_patch() const;
    std::size_t max_batch_bytes() const;  // size of a host buffer that holds any batch, padding included
    // Writes batch.padded patches (padding rows are zero) to dst.
    void fill(const Batch& batch, void* dst);

private:
    const PatchReader& reader_;
    bool baked_in_;
    Normaliser normaliser_;
    std::size_t batch_size_;
    std::vector<Batch> batches_;
    std::vector<std::uint8_t> raw_;
};

}  // namespace pcam
