#include "pcam/output.hpp"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "pcam/error.hpp"

namespace pcam {

namespace {

// RFC 4180 quoting when the field needs it.
std::string csv_field(const std::string& text) {
    if (text.find_first_of(",\"\r\n") == std::string::npos) {
        return text;
    }
    std::string quoted = "\"";
    for (char c : text) {
        quoted += c;
        if (c == '"') {
            quoted += '"';
        }
    }
    return quoted + "\"";
}

// Shortest form that round-trips a float32.
std::string float_text(float value) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%.9g", static_cast<double>(value));
    return buffer;
}

double rate(std::size_t count, double seconds) { return seconds > 0.0 ? static_cast<double>(count) / seconds : 0.0; }

}  // namespace

std::size_t argmax(const std::vector<float>& values) {
    if (values.empty()) {
        throw Error("argmax of an empty list");
    }
    return static_cast<std::size_t>(std::distance(values.begin(), std::max_element(values.begin(), values.end())));
}

double Throughput::patches_per_second() const { return rate(patches, total_seconds); }

double Throughput::inference_patches_per_second() const { return rate(patches, inference_seconds); }

void write_csv(std::ostream& out, const std::vector<std::string>& label_names,
               const std::vector<Prediction>& predictions) {
    out << "file,index";
    for (const std::string& label : label_names) {
        out << ',' << csv_field("prob_" + label);
    }
    out << ",prediction\n";
    for (const Prediction& p : predictions) {
        if (p.probabilities.size() != label_names.size()) {
            throw Error("prediction for '" + p.file + "' has " + std::to_string(p.probabilities.size()) +
                        " probabilities, expected " + std::to_string(label_names.size()));
        }
        out << csv_field(p.file) << ',' << p.index;
        for (float value : p.probabilities) {
            out << ',' << float_text(value);
        }
        out << ',' << csv_field(label_names[argmax(p.probabilities)]) << '\n';
    }
}

void write_json(std::ostream& out, const Sidecar& sidecar, const std::vector<Prediction>& predictions,
                const Throughput& throughput) {
    nlohmann::ordered_json doc;
    doc["format"] = kPredictionsFormat;
    doc["model"] = sidecar.model;
    doc["precision"] = sidecar.precision;
    doc["label_names"] = sidecar.label_names;
    doc["throughput"] = {
        {"patches", throughput.patches},
        {"batches", throughput.batches},
        {"total_seconds", throughput.total_seconds},
        {"inference_seconds", throughput.inference_seconds},
        {"patches_per_second", throughput.patches_per_second()},
        {"inference_patches_per_second", throughput.inference_patches_per_second()},
    };
    nlohmann::ordered_json rows = nlohmann::ordered_json::array();
    for (const Prediction& p : predictions) {
        if (p.probabilities.size() != sidecar.label_names.size()) {
            throw Error("prediction for '" + p.file + "' has " + std::to_string(p.probabilities.size()) +
                        " probabilities, expected " + std::to_string(sidecar.label_names.size()));
        }
        rows.push_back({{"file", p.file},
                        {"index", p.index},
                        {"probabilities", p.probabilities},
                        {"prediction", sidecar.label_names[argmax(p.probabilities)]}});
    }
    doc["predictions"] = std::move(rows);
    out << doc.dump(1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << '\n';
}

std::string throughput_summary(const Throughput& throughput, std::size_t max_batch) {
    char buffer[256];
    int used = std::snprintf(buffer, sizeof buffer, "%zu patches in %zu batches (max %zu) in %.3f s: %.1f patches/s",
                             throughput.patches, throughput.batches, max_batch, throughput.total_seconds,
                             throughput.patches_per_second());
    if (throughput.inference_seconds > 0.0 && used > 0 && static_cast<std::size_t>(used) < sizeof buffer) {
        std::snprintf(buffer + used, sizeof buffer - static_cast<std::size_t>(used),
                      " end to end, %.1f patches/s inference", throughput.inference_patches_per_second());
    }
    return buffer;
}

}  // namespace pcam
