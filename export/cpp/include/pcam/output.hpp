// Per-patch predictions as CSV or JSON, and throughput figures.
#pragma once

#include <cstddef>
#include <ostream>
#include <string>
#include <vector>

#include "pcam/sidecar.hpp"

namespace pcam {

inline constexpr const char* kPredictionsFormat = "timm-inception-pcam-predictions/1";

struct Prediction {
    std::string file;
    std::size_t index = 0;  // index of the patch inside its file
    std::vector<float> probabilities;
};

std::size_t argmax(const std::vector<float>& values);

struct Throughput {
    std::size_t patches = 0;
    std::size_t batches = 0;
    double total_seconds = 0.0;      // reading + preprocessing + inference + softmax
    double inference_seconds = 0.0;  // copies to and from the GPU + engine execution
    double patches_per_second() const;
    double inference_patches_per_second() const;
};

// Columns: file,index,prob_<label>...,prediction.
void write_csv(std::ostream& out, const std::vector<std::string>& label_names,
               const std::vector<Prediction>& predictions);

// {"format", "model", "precision", "label_names", "throughput": {...}, "predictions": [{"file", "index",
//  "probabilities", "prediction"}]}.
void write_json(std::ostream& out, const Sidecar& sidecar, const std::vector<Prediction>& predictions,
                const Throughput& throughput);

// "N patches in B batches (max M) in S s: P patches/s[ end to end, Q patches/s inference]" (inference part only
// when inference_seconds > 0).
std::string throughput_summary(const Throughput& throughput, std::size_t max_batch);

}  // namespace pcam
