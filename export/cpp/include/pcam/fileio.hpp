// Whole-file reads, SHA-256 and atomic writes (temporary name, renamed when complete).
#pragma once

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

namespace pcam {

std::vector<char> read_file_bytes(const std::string& path, const std::string& what = "file");

std::string sha256_hex(const void* data, std::size_t size);
std::string sha256_file(const std::string& path);

// Writes `path` through `fill` into a temporary file beside it, then renames it into place. Nothing is left behind
// when `fill` throws or the stream fails.
void atomic_write(const std::string& path, const std::function<void(std::ostream&)>& fill);

}  // namespace pcam
