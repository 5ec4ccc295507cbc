// pcam_trt_infer: batched inference with a TensorRT 11 engine built by `python -m export.trt`.
//
// Thin on purpose: arguments, sidecar checks, patch reading, preprocessing, batching, softmax and output all live in
// pcam_core (unit-tested without a GPU). This file owns the CUDA and TensorRT objects and the enqueue loop.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "pcam/args.hpp"
#include "pcam/error.hpp"
#include "pcam/fileio.hpp"
#include "pcam/output.hpp"
#include "pcam/patches.hpp"
#include "pcam/pipeline.hpp"
#include "pcam/sidecar.hpp"

namespace {

using Clock = std::chrono::steady_clock;

void check_cuda(cudaError_t status, const char* call) {
    if (status != cudaSuccess) {
        throw pcam::Error(std::string(call) + " failed: " + cudaGetErrorName(status) + " (" +
                          cudaGetErrorString(status) + ")");
    }
}
#define CUDA_CHECK(call) check_cuda((call), #call)

class Logger : public nvinfer1::ILogger {
public:
    explicit Logger(bool quiet) : quiet_(quiet) {}
    void log(Severity severity, const char* message) noexcept override {
        if (severity <= Severity::kERROR || (!quiet_ && severity == Severity::kWARNING)) {
            std::cerr << "TensorRT " << (severity <= Severity::kERROR ? "error" : "warning") << ": " << message
                      << '\n';
        }
    }

private:
    bool quiet_;
};

struct DeviceFree {
    void operator()(void* p) const noexcept { cudaFree(p); }
};
struct HostFree {
    void operator()(void* p) const noexcept { cudaFreeHost(p); }
};
struct StreamDestroy {
    void operator()(cudaStream_t s) const noexcept { cudaStreamDestroy(s); }
};
using DeviceBuffer = std::unique_ptr<void, DeviceFree>;
using HostBuffer = std::unique_ptr<void, HostFree>;
struct EventDestroy {
    void operator()(cudaEvent_t e) const noexcept { cudaEventDestroy(e); }
};
using Stream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;
using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;

DeviceBuffer device_alloc(std::size_t bytes) {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, bytes));
    return DeviceBuffer(p);
}

HostBuffer host_alloc(std::size_t bytes) {
    void* p = nullptr;
    CUDA_CHECK(cudaMallocHost(&p, bytes));
    return HostBuffer(p);
}

// Asks CUDA, never TensorRT, whether a GPU is there: constructing TensorRT objects without one can crash.
void select_gpu(const pcam::Sidecar& sidecar, int device) {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
        throw pcam::Error(std::string("no CUDA GPU is available (cudaGetDeviceCount: ") +
                          (status == cudaSuccess ? "0 devices" : cudaGetErrorName(status)) +
                          "); pcam_trt_infer needs an NVIDIA GPU and driver");
    }
    if (device >= count) {
        throw pcam::Error("--device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
                          " CUDA devices)");
    }
    CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp props{};
    CUDA_CHECK(cudaGetDeviceProperties(&props, device));
    pcam::check_gpu(sidecar, props.name, props.major, props.minor, std::cerr);
}

std::string dims_text(const nvinfer1::Dims& dims) {
    std::string text = "[";
    for (int32_t i = 0; i < dims.nbDims; ++i) {
        text += (i ? ", " : "") + std::to_string(dims.d[i]);
    }
    return text + "]";
}

std::string type_text(nvinfer1::DataType type) {
    switch (type) {
        case nvinfer1::DataType::kFLOAT:
            return "float32";
        case nvinfer1::DataType::kHALF:
            return "float16";
        case nvinfer1::DataType::kUINT8:
            return "uint8";
        default:
            return "TensorRT DataType " + std::to_string(static_cast<int>(type));
    }
}

// The engine's I/O tensors must be the ones the sidecar describes.
void check_engine_io(const nvinfer1::ICudaEngine& engine, const pcam::Sidecar& sidecar, const std::string& plan) {
    const int32_t n = engine.getNbIOTensors();
    std::string names;
    for (int32_t i = 0; i < n; ++i) {
        names += (i ? ", " : "") + std::string(engine.getIOTensorName(i));
    }
    if (n != 2) {
        throw pcam::Error("plan '" + plan + "' has " + std::to_string(n) + " I/O tensors (" + names +
                          "), expected 2 (input '" + sidecar.input.name + "', output '" + sidecar.output.name + "')");
    }
    const auto expect = [&](const pcam::TensorSpec& spec, nvinfer1::TensorIOMode mode, nvinfer1::DataType type) {
        const char* name = spec.name.c_str();
        if (engine.getTensorIOMode(name) != mode) {
            throw pcam::Error("plan '" + plan + "' has no " +
                              (mode == nvinfer1::TensorIOMode::kINPUT ? "input" : "output") + " tensor named '" +
                              spec.name + "' as its sidecar '" + sidecar.source + "' says (tensors: " + names + ")");
        }
        if (engine.getTensorDataType(name) != type) {
            throw pcam::Error("plan '" + plan + "': tensor '" + spec.name + "' is " +
                              type_text(engine.getTensorDataType(name)) + ", expected " + spec.dtype +
                              " as the sidecar '" + sidecar.source + "' says");
        }
        const nvinfer1::Dims shape = engine.getTensorShape(name);
        bool same = shape.nbDims == static_cast<int32_t>(spec.shape.size());
        for (int32_t i = 0; same && i < shape.nbDims; ++i) {
            same = shape.d[i] == spec.shape[static_cast<std::size_t>(i)];
        }
        if (!same) {
            throw pcam::Error("plan '" + plan + "': tensor '" + spec.name + "' has shape " + dims_text(shape) +
                              " but the sidecar '" + sidecar.source + "' says otherwise");
        }
    };
    const auto input_type = sidecar.baked_in ? nvinfer1::DataType::kUINT8 : nvinfer1::DataType::kFLOAT;
    expect(sidecar.input, nvinfer1::TensorIOMode::kINPUT, input_type);
    expect(sidecar.output, nvinfer1::TensorIOMode::kOUTPUT, nvinfer1::DataType::kFLOAT);
    const nvinfer1::Dims max_shape =
        engine.getProfileShape(sidecar.input.name.c_str(), 0, nvinfer1::OptProfileSelector::kMAX);
    if (max_shape.nbDims < 1 || max_shape.d[0] != sidecar.profile_max) {
        throw pcam::Error("plan '" + plan + "': profile 0 allows input shapes up to " + dims_text(max_shape) +
                          " but the sidecar's profile.max is " + std::to_string(sidecar.profile_max));
    }
}

int run(const pcam::Options& options) {
    const auto t0 = Clock::now();
    // Everything that can fail without a GPU fails first.
    const pcam::Sidecar sidecar = pcam::load_sidecar(options.sidecar);
    const std::vector<char> plan = pcam::read_file_bytes(options.engine, "plan");
    pcam::check_plan_sha256(sidecar, options.engine, pcam::sha256_hex(plan.data(), plan.size()));
    const pcam::PatchReader reader(options.inputs);
    pcam::InputPipeline pipeline(sidecar, reader, pcam::resolve_batch_size(options.batch_size, sidecar));
    pcam::check_tensorrt_version(sidecar, getInferLibVersion());
    select_gpu(sidecar, options.device);

    // Declaration order is destruction order reversed: context, then engine, then runtime (the logger outlives all).
    Logger logger(options.quiet);
    const std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
    if (!runtime) {
        throw pcam::Error("createInferRuntime failed");
    }
    if (sidecar.version_compatible) {
        runtime->setEngineHostCodeAllowed(true);  // a version-compatible plan carries the lean runtime it runs on
    }
    const std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine) {
        throw pcam::Error("plan '" + options.engine + "' could not be deserialized (see the TensorRT errors above)");
    }
    check_engine_io(*engine, sidecar, options.engine);
    const std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
    if (!context) {
        throw pcam::Error("createExecutionContext failed for plan '" + options.engine + "'");
    }

    const std::size_t classes = sidecar.num_classes();
    const std::size_t max_rows = pipeline.max_batch_bytes() / pipeline.bytes_per_patch();
    const std::size_t input_bytes = pipeline.max_batch_bytes();
    const std::size_t output_bytes = max_rows * classes * sizeof(float);
    Stream stream;
    Event started;
    Event finished;
    {
        cudaStream_t s = nullptr;
        CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        stream.reset(s);
        cudaEvent_t e = nullptr;
        CUDA_CHECK(cudaEventCreate(&e));
        started.reset(e);
        CUDA_CHECK(cudaEventCreate(&e));
        finished.reset(e);
    }
    // Two page-locked input buffers: the next batch is read and preprocessed while the GPU runs the current one.
    const HostBuffer host_inputs[2] = {host_alloc(input_bytes), host_alloc(input_bytes)};
    const HostBuffer host_output = host_alloc(output_bytes);
    const DeviceBuffer device_input = device_alloc(input_bytes);
    const DeviceBuffer device_output = device_alloc(output_bytes);
    if (!context->setTensorAddress(sidecar.input.name.c_str(), device_input.get()) ||
        !context->setTensorAddress(sidecar.output.name.c_str(), device_output.get())) {
        throw pcam::Error("setTensorAddress failed");
    }

    // Queues copy in, inference and copy out of `rows` rows of `host_input` on the stream; does not wait.
    const auto enqueue = [&](const void* host_input, std::size_t rows) {
        nvinfer1::Dims shape{};
        shape.nbDims = 4;
        shape.d[0] = static_cast<int64_t>(rows);
        for (std::size_t i = 1; i < 4; ++i) {
            shape.d[i] = sidecar.input.shape[i];
        }
        if (!context->setInputShape(sidecar.input.name.c_str(), shape)) {
            throw pcam::Error("setInputShape " + dims_text(shape) + " was refused for '" + sidecar.input.name + "'");
        }
        CUDA_CHECK(cudaEventRecord(started.get(), stream.get()));
        CUDA_CHECK(cudaMemcpyAsync(device_input.get(), host_input, rows * pipeline.bytes_per_patch(),
                                   cudaMemcpyHostToDevice, stream.get()));
        if (!context->enqueueV3(stream.get())) {
            throw pcam::Error("enqueueV3 failed (see the TensorRT errors above)");
        }
        CUDA_CHECK(cudaMemcpyAsync(host_output.get(), device_output.get(), rows * classes * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream.get()));
        CUDA_CHECK(cudaEventRecord(finished.get(), stream.get()));
    };
    // Waits for the queued batch; returns its GPU time in seconds (copies included).
    const auto wait = [&]() {
        CUDA_CHECK(cudaStreamSynchronize(stream.get()));
        float milliseconds = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&milliseconds, started.get(), finished.get()));
        return static_cast<double>(milliseconds) / 1000.0;
    };

    std::memset(host_inputs[0].get(), 0, input_bytes);
    for (int i = 0; i < options.warmup; ++i) {
        enqueue(host_inputs[0].get(), pipeline.batch_size());
        wait();
    }

    const auto& batches = pipeline.batches();
    std::vector<pcam::Prediction> predictions;
    predictions.reserve(reader.size());
    std::vector<float> probabilities(max_rows * classes);
    pcam::Throughput throughput;
    const auto timed_start = Clock::now();
    if (!batches.empty()) {
        pipeline.fill(batches[0], host_inputs[0].get());
    }
    for (std::size_t b = 0; b < batches.size(); ++b) {
        const pcam::Batch& batch = batches[b];
        enqueue(host_inputs[b % 2].get(), batch.padded);
        if (b + 1 < batches.size()) {
            pipeline.fill(batches[b + 1], host_inputs[(b + 1) % 2].get());
        }
        throughput.inference_seconds += wait();
        const auto* logits = static_cast<const float*>(host_output.get());
        if (sidecar.activation == "softmax") {
            pcam::softmax_rows(logits, batch.count, classes, probabilities.data());
        } else {
            std::memcpy(probabilities.data(), logits, batch.count * classes * sizeof(float));
        }
        for (std::size_t r = 0; r < batch.count; ++r) {
            const pcam::PatchLocation where = reader.locate(batch.start + r);
            const float* row = probabilities.data() + r * classes;
            predictions.push_back({*where.file, where.index, std::vector<float>(row, row + classes)});
        }
        if (!options.quiet) {
            std::cerr << "\rpcam_trt_infer: batch " << b + 1 << "/" << batches.size() << std::flush;
        }
    }
    if (!options.quiet && !batches.empty()) {
        std::cerr << '\n';
    }
    throughput.patches = reader.size();
    throughput.batches = batches.size();
    throughput.total_seconds = std::chrono::duration<double>(Clock::now() - timed_start).count();

    const auto write = [&](std::ostream& out) {
        if (options.format == pcam::OutputFormat::Json) {
            pcam::write_json(out, sidecar, predictions, throughput);
        } else {
            pcam::write_csv(out, sidecar.label_names, predictions);
        }
    };
    if (options.output.empty() || options.output == "-") {
        write(std::cout);
        std::cout.flush();
    } else {
        pcam::atomic_write(options.output, write);
    }
    const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
    std::cerr << "pcam_trt_infer: " << sidecar.model << " (" << sidecar.precision << "): "
              << pcam::throughput_summary(throughput, pipeline.batch_size()) << "; " << wall << " s in all"
              << (options.output.empty() || options.output == "-" ? "" : ", wrote " + options.output) << '\n';
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const pcam::Options options = pcam::parse_args(pcam::Tool::Infer, argc, argv);
        if (options.help) {
            std::cout << pcam::usage(pcam::Tool::Infer);
            return 0;
        }
        return run(options);
    } catch (const std::exception& error) {
        std::cerr << "pcam_trt_infer: error: " << error.what() << '\n';
        return 1;
    }
}
