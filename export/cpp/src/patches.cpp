#include "pcam/patches.hpp"

#include <png.h>

#include <algorithm>
#include <cctype>
#include <csetjmp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "pcam/error.hpp"
#include "pcam/sidecar.hpp"

namespace fs = std::filesystem;

namespace pcam {

namespace {

constexpr std::size_t kRowBytes = std::size_t{kPatchWidth} * kPatchChannels;

struct PngFailure {
    char message[256];
};

void on_png_error(png_structp png, png_const_charp message) {
    auto* failure = static_cast<PngFailure*>(png_get_error_ptr(png));
    std::snprintf(failure->message, sizeof failure->message, "%s", message);
    png_longjmp(png, 1);
}

void on_png_warning(png_structp, png_const_charp) {}

// C-style on purpose: libpng reports errors with longjmp, so no object with a destructor may live in this frame.
// With out == nullptr only the header is read; otherwise the 96x96 image is decoded to 8-bit RGB into out.
bool decode_png(std::FILE* file, std::uint8_t* out, png_uint_32* width, png_uint_32* height, PngFailure* failure) {
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, failure, on_png_error, on_png_warning);
    if (png == nullptr) {
        std::snprintf(failure->message, sizeof failure->message, "libpng could not allocate a reader");
        return false;
    }
    png_infop info = png_create_info_struct(png);
    if (info == nullptr) {
        png_destroy_read_struct(&png, nullptr, nullptr);
        std::snprintf(failure->message, sizeof failure->message, "libpng could not allocate a reader");
        return false;
    }
    png_bytep rows[kPatchHeight];
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, nullptr);
        return false;
    }
    png_init_io(png, file);
    png_read_info(png, info);
    *width = png_get_image_width(png, info);
    *height = png_get_image_height(png, info);
    if (out == nullptr || *width != kPatchWidth || *height != kPatchHeight) {
        png_destroy_read_struct(&png, &info, nullptr);
        return true;
    }
    const int color_type = png_get_color_type(png, info);
    const int bit_depth = png_get_bit_depth(png, info);
    if (color_type == PNG_COLOR_TYPE_PALETTE) {
        png_set_palette_to_rgb(png);
    }
    if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) {
        png_set_expand_gray_1_2_4_to_8(png);
    }
    if (bit_depth == 16) {
        png_set_strip_16(png);
    }
    if ((color_type & PNG_COLOR_MASK_ALPHA) != 0) {
        png_set_strip_alpha(png);
    }
    if (color_type == PNG_COLOR_TYPE_GRAY || color_type == PNG_COLOR_TYPE_GRAY_ALPHA) {
        png_set_gray_to_rgb(png);
    }
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_rowbytes(png, info) != kRowBytes) {
        std::snprintf(failure->message, sizeof failure->message, "decodes to %lu bytes per row, expected %lu",
                      static_cast<unsigned long>(png_get_rowbytes(png, info)), static_cast<unsigned long>(kRowBytes));
        png_destroy_read_struct(&png, &info, nullptr);
        return false;
    }
    for (int y = 0; y < kPatchHeight; ++y) {
        rows[y] = out + static_cast<std::size_t>(y) * kRowBytes;
    }
    png_read_image(png, rows);
    png_read_end(png, nullptr);
    png_destroy_read_struct(&png, &info, nullptr);
    return true;
}

std::vector<std::uint8_t> decode_png_file(const std::string& path, bool header_only) {
    const std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!file) {
        throw Error("PNG patch '" + path + "' cannot be opened");
    }
    std::vector<std::uint8_t> pixels(header_only ? 0 : kPatchBytes);
    PngFailure failure{};
    png_uint_32 width = 0;
    png_uint_32 height = 0;
    if (!decode_png(file.get(), header_only ? nullptr : pixels.data(), &width, &height, &failure)) {
        throw Error("PNG patch '" + path + "' cannot be decoded: " + failure.message);
    }
    if (width != kPatchWidth || height != kPatchHeight) {
        throw Error("PNG patch '" + path + "' is " + std::to_string(width) + "x" + std::to_string(height) +
                    " pixels, expected " + std::to_string(kPatchWidth) + "x" + std::to_string(kPatchHeight));
    }
    return pixels;
}

std::string lower_extension(const std::string& path) {
    std::string ext = fs::path(path).extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return ext;
}

}  // namespace

std::vector<std::uint8_t> read_png_patch(const std::string& path) { return decode_png_file(path, false); }

std::size_t raw_patch_count(const std::string& path) {
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) {
        throw Error("raw patch file '" + path + "' does not exist or is not a regular file");
    }
    const std::uintmax_t size = fs::file_size(path, ec);
    if (ec) {
        throw Error("raw patch file '" + path + "': cannot read its size (" + ec.message() + ")");
    }
    if (size == 0 || size % kPatchBytes != 0) {
        throw Error("raw patch file '" + path + "' holds " + std::to_string(size) +
                    " bytes, expected a positive multiple of " + std::to_string(kPatchBytes) +
                    " (N patches of 96x96x3 uint8, NHWC)");
    }
    return static_cast<std::size_t>(size / kPatchBytes);
}

PatchReader::PatchReader(const std::vector<std::string>& files) {
    for (const std::string& file : files) {
        Entry entry;
        entry.file = file;
        const std::string ext = lower_extension(file);
        if (ext == ".png") {
            std::error_code ec;
            if (!fs::is_regular_file(file, ec)) {
                throw Error("PNG patch '" + file + "' does not exist or is not a regular file");
            }
            decode_png_file(file, true);
            entry.png = true;
            entry.count = 1;
        } else if (ext == ".bin" || ext == ".raw") {
            entry.count = raw_patch_count(file);
        } else {
            throw Error("patch file '" + file + "' has extension '" + ext +
                        "', expected .bin or .raw (uint8 NHWC, N*96*96*3 bytes) or .png (96x96)");
        }
        entry.first = total_;
        total_ += entry.count;
        entries_.push_back(std::move(entry));
    }
}

std::size_t PatchReader::entry_of(std::size_t patch) const {
    if (patch >= total_) {
        throw Error("patch index " + std::to_string(patch) + " is out of range (" + std::to_string(total_) +
                    " patches)");
    }
    const auto it = std::upper_bound(entries_.begin(), entries_.end(), patch,
                                     [](std::size_t value, const Entry& entry) { return value < entry.first; });
    return static_cast<std::size_t>(std::distance(entries_.begin(), it)) - 1;
}

PatchLocation PatchReader::locate(std::size_t patch) const {
    const Entry& entry = entries_[entry_of(patch)];
    return {&entry.file, patch - entry.first};
}

void PatchReader::read(std::size_t start, std::size_t count, std::uint8_t* dst) const {
    if (count == 0) {
        return;
    }
    if (start + count > total_) {
        throw Error("patches [" + std::to_string(start) + ", " + std::to_string(start + count) +
                    ") are out of range (" + std::to_string(total_) + " patches)");
    }
    std::size_t done = 0;
    for (std::size_t e = entry_of(start); done < count; ++e) {
        const Entry& entry = entries_[e];
        const std::size_t local = start + done - entry.first;
        const std::size_t take = std::min(entry.count - local, count - done);
        std::uint8_t* out = dst + done * kPatchBytes;
        if (entry.png) {
            const std::vector<std::uint8_t> pixels = read_png_patch(entry.file);
            std::copy(pixels.begin(), pixels.end(), out);
        } else {
            std::ifstream in(entry.file, std::ios::binary);
            in.seekg(static_cast<std::streamoff>(local * kPatchBytes));
            if (!in || !in.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(take * kPatchBytes))) {
                throw Error("raw patch file '" + entry.file + "': cannot read patches " + std::to_string(local) +
                            ".." + std::to_string(local + take - 1) + " (file changed or unreadable?)");
            }
        }
        done += take;
    }
}

}  // namespace pcam
