// Reading PCam patches: raw uint8 NHWC files (.bin/.raw, N*96*96*3 bytes) and 96x96 PNG images.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pcam {

// One 96x96x3 uint8 RGB patch (HWC) decoded from a PNG file. Palette and grey images are expanded to RGB, 16-bit
// samples keep their high byte and alpha is dropped (the same pixels as PIL's Image.convert('RGB')).
std::vector<std::uint8_t> read_png_patch(const std::string& path);

// Number of patches in a raw file; raises unless its size is a positive multiple of 96*96*3.
std::size_t raw_patch_count(const std::string& path);

struct PatchLocation {
    const std::string* file;
    std::size_t index;  // index of the patch inside its file
};

// All patches of a list of files, addressed by one running index. Files are checked when the reader is built
// (sizes, PNG headers) so bad input fails before any inference starts; pixels are read on demand.
class PatchReader {
public:
    explicit PatchReader(const std::vector<std::string>& files);

    std::size_t size() const { return total_; }
    PatchLocation locate(std::size_t patch) const;
    // Copies patches [start, start + count) as uint8 NHWC into dst (count * kPatchBytes bytes).
    void read(std::size_t start, std::size_t count, std::uint8_t* dst) const;

private:
    struct Entry {
        std::string file;
        bool png = false;
        std::size_t first = 0;
        std::size_t count = 0;
    };
    std::size_t entry_of(std::size_t patch) const;

    std::vector<Entry> entries_;
    std::size_t total_ = 0;
};

}  // namespace pcam
