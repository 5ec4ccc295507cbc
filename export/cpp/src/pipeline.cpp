#include "pcam/pipeline.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "pcam/error.hpp"

namespace pcam {

Normaliser::Normaliser(const std::array<double, 3>& mean, const std::array<double, 3>& std, double scale) {
    const float scale_f = static_cast<float>(scale);
    for (std::size_t c = 0; c < 3; ++c) {
        const float mean_f = static_cast<float>(mean[c]);
        const float std_f = static_cast<float>(std[c]);
        multiplier_[c] = 1.0f / (scale_f * std_f);
        offset_[c] = mean_f / std_f;
    }
}

void Normaliser::operator()(const std::uint8_t* nhwc, std::size_t count, float* nchw) const {
    constexpr std::size_t plane = std::size_t{kPatchHeight} * kPatchWidth;
    for (std::size_t n = 0; n < count; ++n) {
        const std::uint8_t* src = nhwc + n * kPatchBytes;
        float* dst = nchw + n * kPatchBytes;
        for (std::size_t p = 0; p < plane; ++p) {
            for (std::size_t c = 0; c < 3; ++c) {
                dst[c * plane + p] = static_cast<float>(src[p * 3 + c]) * multiplier_[c] - offset_[c];
            }
        }
    }
}

std::size_t resolve_batch_size(int requested, const Sidecar& sidecar) {
    if (requested == 0) {
        return static_cast<std::size_t>(sidecar.profile_max);
    }
    if (requested < sidecar.profile_min || requested > sidecar.profile_max) {
        throw Error("batch size " + std::to_string(requested) + " is outside the engine's optimisation profile [" +
                    std::to_string(sidecar.profile_min) + ", " + std::to_string(sidecar.profile_max) + "] (" +
                    sidecar.source + ")");
    }
    return static_cast<std::size_t>(requested);
}

std::vector<Batch> plan_batches(std::size_t n, std::size_t batch_size, std::size_t profile_min) {
    if (batch_size == 0) {
        throw Error("batch size must be at least 1");
    }
    if (profile_min > batch_size) {
        throw Error("batch size " + std::to_string(batch_size) + " is below the profile's min " +
                    std::to_string(profile_min));
    }
    std::vector<Batch> batches;
    for (std::size_t start = 0; start < n; start += batch_size) {
        const std::size_t count = std::min(batch_size, n - start);
        batches.push_back({start, count, std::max(count, profile_min)});
    }
    return batches;
}

void softmax_rows(const float* logits, std::size_t rows, std::size_t cols, float* probs) {
    for (std::size_t r = 0; r < rows; ++r) {
        const float* in = logits + r * cols;
        float* out = probs + r * cols;
        const double top = *std::max_element(in, in + cols);
        double total = 0.0;
        for (std::size_t c = 0; c < cols; ++c) {
            total += std::exp(static_cast<double>(in[c]) - top);
        }
        for (std::size_t c = 0; c < cols; ++c) {
            out[c] = static_cast<float>(std::exp(static_cast<double>(in[c]) - top) / total);
        }
    }
}

InputPipeline::InputPipeline(const Sidecar& sidecar, const PatchReader& reader, std::size_t batch_size)
    : reader_(reader),
      baked_in_(sidecar.baked_in),
      normaliser_(sidecar.mean, sidecar.std, sidecar.scale),
      batch_size_(batch_size),
      batches_(plan_batches(reader.size(), batch_size, static_cast<std::size_t>(sidecar.profile_min))) {
    if (!baked_in_) {
        raw_.resize(std::max<std::size_t>(batch_size, static_cast<std::size_t>(sidecar.profile_min)) * kPatchBytes);
    }
}

std::size_t InputPipeline::bytes_per_patch() const { return kPatchBytes * (baked_in_ ? 1 : sizeof(float)); }

std::size_t InputPipeline::max_batch_bytes() const {
    std::size_t rows = batch_size_;
    for (const Batch& batch : batches_) {
        rows = std::max(rows, batch.padded);
    }
    return rows * bytes_per_patch();
}

void InputPipeline::fill(const Batch& batch, void* dst) {
    auto* bytes = static_cast<std::uint8_t*>(dst);
    if (baked_in_) {
        reader_.read(batch.start, batch.count, bytes);
    } else {
        reader_.read(batch.start, batch.count, raw_.data());
        normaliser_(raw_.data(), batch.count, reinterpret_cast<float*>(dst));
    }
    const std::size_t used = batch.count * bytes_per_patch();
    std::memset(bytes + used, 0, batch.padded * bytes_per_patch() - used);
}

}  // namespace pcam
