// pcam_preprocess: everything pcam_trt_infer does except inference. Writes the engine input of every patch.
#include <chrono>
#include <filesystem>
#include <iostream>
#include <vector>

#include "pcam/args.hpp"
#include "pcam/error.hpp"
#include "pcam/fileio.hpp"
#include "pcam/output.hpp"
#include "pcam/patches.hpp"
#include "pcam/pipeline.hpp"
#include "pcam/sidecar.hpp"

namespace {

int run(const pcam::Options& options) {
    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    const pcam::Sidecar sidecar = pcam::load_sidecar(options.sidecar);
    if (!options.engine.empty()) {
        std::error_code ec;
        if (!std::filesystem::is_regular_file(options.engine, ec)) {
            throw pcam::Error("plan '" + options.engine + "' does not exist or is not a regular file");
        }
        pcam::check_plan_sha256(sidecar, options.engine, pcam::sha256_file(options.engine));
    }
    const pcam::PatchReader reader(options.inputs);
    pcam::InputPipeline pipeline(sidecar, reader, pcam::resolve_batch_size(options.batch_size, sidecar));
    std::vector<float> buffer((pipeline.max_batch_bytes() + sizeof(float) - 1) / sizeof(float));
    const auto& batches = pipeline.batches();

    pcam::atomic_write(options.output, [&](std::ostream& out) {
        for (std::size_t b = 0; b < batches.size(); ++b) {
            pipeline.fill(batches[b], buffer.data());
            out.write(reinterpret_cast<const char*>(buffer.data()),
                      static_cast<std::streamsize>(batches[b].count * pipeline.bytes_per_patch()));
            if (!options.quiet) {
                std::cerr << "\rpcam_preprocess: batch " << b + 1 << "/" << batches.size() << std::flush;
            }
        }
        if (!options.quiet && !batches.empty()) {
            std::cerr << '\n';
        }
    });

    pcam::Throughput throughput;
    throughput.patches = reader.size();
    throughput.batches = batches.size();
    throughput.total_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    std::cerr << "pcam_preprocess: wrote " << reader.size() << " patches as "
              << (pipeline.float_input() ? "float32 NCHW (N,3,96,96)" : "uint8 NHWC (N,96,96,3)") << " to "
              << options.output << " for " << sidecar.model << " (" << sidecar.precision << "); "
              << pcam::throughput_summary(throughput, pipeline.batch_size()) << '\n';
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const pcam::Options options = pcam::parse_args(pcam::Tool::Preprocess, argc, argv);
        if (options.help) {
            std::cout << pcam::usage(pcam::Tool::Preprocess);
            return 0;
        }
        return run(options);
    } catch (const std::exception& error) {
        std::cerr << "pcam_preprocess: error: " << error.what() << '\n';
        return 1;
    }
}
