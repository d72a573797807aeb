// Reads the metadata_props of an .onnx file (ModelProto field 14) without protobuf or ONNX libraries: the
// top level of the file is walked with the protobuf wire format, skipping the graph. `sdca export` stores the
// preprocessing there (mean, std, scale, channel order, input size) with the class names and palette, as JSON
// strings; number_list() reads the numbers out of such a JSON array.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace sdca {

namespace detail {

inline uint64_t read_varint(const std::string& buf, size_t& pos) {
  uint64_t value = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (pos >= buf.size()) throw std::runtime_error("truncated varint");
    const auto byte = static_cast<uint8_t>(buf[pos++]);
    value |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if (!(byte & 0x80)) return value;
  }
  throw std::runtime_error("varint longer than 10 bytes");
}

// Calls visit(field, bytes) for each length-delimited field of the message in buf[begin, end); skips the rest.
template <typename Visit>
void walk(const std::string& buf, size_t begin, size_t end, Visit visit) {
  size_t pos = begin;
  while (pos < end) {
    const uint64_t tag = read_varint(buf, pos);
    const uint32_t field = static_cast<uint32_t>(tag >> 3), wire = static_cast<uint32_t>(tag & 7);
    switch (wire) {
      case 0: read_varint(buf, pos); break;
      case 1: pos += 8; break;
      case 5: pos += 4; break;
      case 2: {
        const uint64_t length = read_varint(buf, pos);
        if (length > end - pos) throw std::runtime_error("field runs past the end of the message");
        visit(field, pos, static_cast<size_t>(length));
        pos += static_cast<size_t>(length);
        break;
      }
      default: throw std::runtime_error("unsupported protobuf wire type " + std::to_string(wire));
    }
  }
  if (pos != end) throw std::runtime_error("message does not end on a field boundary");
}

}  // namespace detail

// key -> value of the model's metadata_props. Throws std::runtime_error naming the file on any failure.
inline std::map<std::string, std::string> read_onnx_metadata(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(path + ": cannot open");
  std::string buf((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::map<std::string, std::string> props;
  try {
    detail::walk(buf, 0, buf.size(), [&](uint32_t field, size_t at, size_t length) {
      if (field != 14) return;  // ModelProto.metadata_props (StringStringEntryProto: 1 key, 2 value)
      std::string key, value;
      detail::walk(buf, at, at + length, [&](uint32_t f, size_t a, size_t n) {
        if (f == 1) key = buf.substr(a, n);
        if (f == 2) value = buf.substr(a, n);
      });
      props[key] = value;
    });
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": not a readable ONNX model (" + e.what() + ")");
  }
  return props;
}

// The numbers of a JSON array such as "[0.485, 0.456, 0.406]" or "[[128, 64, 128], [244, 35, 232]]", flattened.
inline std::vector<double> number_list(const std::string& json) {
  std::vector<double> out;
  const char* p = json.c_str();
  while (*p) {
    if ((*p >= '0' && *p <= '9') || *p == '-' || *p == '.') {
      char* next = nullptr;
      out.push_back(std::strtod(p, &next));
      p = next;
    } else {
      ++p;
    }
  }
  return out;
}

}  // namespace sdca
