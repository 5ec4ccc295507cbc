// Command-line options shared by pcam_trt_infer and pcam_preprocess.
#pragma once

#include <string>
#include <vector>

namespace pcam {

enum class Tool { Infer, Preprocess };
enum class OutputFormat { Csv, Json };

struct Options {
    std::string engine;               // --engine PLAN
    std::string sidecar;              // --sidecar JSON (default: PLAN.json)
    std::vector<std::string> inputs;  // positional patch files, plus those of --input-list
    int batch_size = 0;               // --batch-size (0: the profile's max)
    OutputFormat format = OutputFormat::Csv;
    std::string output;  // Infer: predictions file ("" or "-": stdout). Preprocess: tensor file (required).
    int warmup = 3;      // Infer: untimed batches run before timing
    int device = 0;      // Infer: CUDA device index
    bool quiet = false;  // no progress on stderr
    bool help = false;
};

// argv[0] is skipped. Raises pcam::Error for unknown options, missing values and bad numbers.
Options parse_args(Tool tool, const std::vector<std::string>& args);
Options parse_args(Tool tool, int argc, const char* const* argv);

std::string usage(Tool tool);

// Reads one path per line; blank lines and lines starting with '#' are skipped.
std::vector<std::string> read_input_list(const std::string& path);

}  // namespace pcam
