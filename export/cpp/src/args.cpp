#include "pcam/args.hpp"

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <limits>

#include "pcam/error.hpp"
#include "pcam/sidecar.hpp"

namespace pcam {

namespace {

int parse_int(const std::string& option, const std::string& text, int min_value) {
    errno = 0;
    char* end = nullptr;
    const long value = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno == ERANGE || value < min_value ||
        value > std::numeric_limits<int>::max()) {
        throw Error("option " + option + ": '" + text + "' is not an integer >= " + std::to_string(min_value));
    }
    return static_cast<int>(value);
}

}  // namespace

std::string usage(Tool tool) {
    if (tool == Tool::Preprocess) {
        return "usage: pcam_preprocess (--engine PLAN | --sidecar JSON) --output TENSOR [options] PATCHES...\n"
               "\n"
               "Runs everything pcam_trt_infer does except inference: reads the sidecar (and checks the plan's\n"
               "sha256 when --engine is given), reads the patches, batches and preprocesses them as the engine\n"
               "expects, and writes the engine input of all patches to TENSOR (raw little-endian float32 NCHW,\n"
               "or uint8 NHWC when preprocessing is baked into the engine; padding rows are not written).\n"
               "\n"
               "  PATCHES              raw uint8 NHWC files (.bin/.raw, N*96*96*3 bytes) or 96x96 .png images\n"
               "  --engine PLAN        serialized TensorRT plan; its sidecar defaults to PLAN.json\n"
               "  --sidecar JSON       engine sidecar written by python -m export.trt\n"
               "  --output TENSOR      where to write the preprocessed tensor\n"
               "  --batch-size N       patches per batch (default: the profile's max)\n"
               "  --input-list FILE    read more patch paths from FILE, one per line\n"
               "  --quiet              no progress on stderr\n"
               "  -h, --help           show this help\n";
    }
    return "usage: pcam_trt_infer --engine PLAN [options] PATCHES...\n"
           "\n"
           "Classifies PCam patches with a TensorRT engine built by python -m export.trt and prints one row of\n"
           "class probabilities per patch.\n"
           "\n"
           "  PATCHES              raw uint8 NHWC files (.bin/.raw, N*96*96*3 bytes) or 96x96 .png images\n"
           "  --engine PLAN        serialized TensorRT plan\n"
           "  --sidecar JSON       engine sidecar (default: PLAN.json)\n"
           "  --output FILE        predictions file (default: stdout)\n"
           "  --format csv|json    output format (default: csv)\n"
           "  --batch-size N       patches per batch (default: the profile's max)\n"
           "  --warmup N           untimed batches before timing (default: 3)\n"
           "  --device N           CUDA device index (default: 0)\n"
           "  --input-list FILE    read more patch paths from FILE, one per line\n"
           "  --quiet              no progress on stderr\n"
           "  -h, --help           show this help\n";
}

std::vector<std::string> read_input_list(const std::string& path) {
    std::ifstream in(path);
    if (!in) {
        throw Error("input list '" + path + "' cannot be opened");
    }
    std::vector<std::string> paths;
    std::string line;
    while (std::getline(in, line)) {
        while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) {
            line.pop_back();
        }
        if (!line.empty() && line.front() != '#') {
            paths.push_back(line);
        }
    }
    return paths;
}

Options parse_args(Tool tool, const std::vector<std::string>& args) {
    Options options;
    bool only_positional = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string arg = args[i];
        if (only_positional || arg.empty() || arg[0] != '-' || arg == "-") {
            options.inputs.push_back(arg);
            continue;
        }
        if (arg == "--") {
            only_positional = true;
            continue;
        }
        if (arg == "-h" || arg == "--help") {
            options.help = true;
            continue;
        }
        if (arg == "--quiet") {
            options.quiet = true;
            continue;
        }
        std::string value;
        bool has_value = false;
        if (const auto eq = arg.find('='); eq != std::string::npos) {
            value = arg.substr(eq + 1);
            arg = arg.substr(0, eq);
            has_value = true;
        }
        const bool known = arg == "--engine" || arg == "--sidecar" || arg == "--output" || arg == "--batch-size" ||
                           arg == "--input-list" ||
                           (tool == Tool::Infer && (arg == "--format" || arg == "--warmup" || arg == "--device"));
        if (!known) {
            throw Error("unknown option '" + arg + "' (see --help)");
        }
        if (!has_value) {
            if (i + 1 >= args.size()) {
                throw Error("option " + arg + " expects a value");
            }
            value = args[++i];
        }
        if (arg == "--engine") {
            options.engine = value;
        } else if (arg == "--sidecar") {
            options.sidecar = value;
        } else if (arg == "--output") {
            options.output = value;
        } else if (arg == "--batch-size") {
            options.batch_size = parse_int(arg, value, 1);
        } else if (arg == "--input-list") {
            for (auto& path : read_input_list(value)) {
                options.inputs.push_back(std::move(path));
            }
        } else if (arg == "--format") {
            if (value == "csv") {
                options.format = OutputFormat::Csv;
            } else if (value == "json") {
                options.format = OutputFormat::Json;
            } else {
                throw Error("option --format: '" + value + "' is not one of csv, json");
            }
        } else if (arg == "--warmup") {
            options.warmup = parse_int(arg, value, 0);
        } else if (arg == "--device") {
            options.device = parse_int(arg, value, 0);
        }
    }
    if (options.help) {
        return options;
    }
    if (tool == Tool::Infer && options.engine.empty()) {
        throw Error("--engine PLAN is required (see --help)");
    }
    if (tool == Tool::Preprocess) {
        if (options.engine.empty() && options.sidecar.empty()) {
            throw Error("--engine PLAN or --sidecar JSON is required (see --help)");
        }
        if (options.output.empty() || options.output == "-") {
            throw Error("--output TENSOR is required (see --help)");
        }
    }
    if (options.sidecar.empty()) {
        options.sidecar = default_sidecar_path(options.engine);
    }
    if (options.inputs.empty()) {
        throw Error("no patch files given (see --help)");
    }
    return options;
}

Options parse_args(Tool tool, int argc, const char* const* argv) {
    std::vector<std::string> args;
    for (int i = 1; i < argc; ++i) {
        args.emplace_back(argv[i]);
    }
    return parse_args(tool, args);
}

}  // namespace pcam
