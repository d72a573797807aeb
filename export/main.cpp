// sdca_segment MODEL.onnx INPUT_IMAGE OUTPUT_LABELS.png [--color OUTPUT_COLOR.png]
// Writes the label map (one byte per pixel, the class index) of INPUT_IMAGE at its own size.
#include <chrono>
#include <cstring>
#include <exception>
#include <iostream>
#include <string>

#include <opencv2/imgcodecs.hpp>

#include "segmenter.hpp"

int main(int argc, char** argv) {
  std::string color_path;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--color") && i + 1 < argc) {
      color_path = argv[++i];
    } else if (!std::strcmp(argv[i], "-h") || !std::strcmp(argv[i], "--help")) {
      positional.clear();
      break;
    } else {
      positional.emplace_back(argv[i]);
    }
  }
  if (positional.size() != 3) {
    std::cerr << "usage: sdca_segment MODEL.onnx INPUT_IMAGE OUTPUT_LABELS.png [--color OUTPUT_COLOR.png]\n"
                 "  MODEL.onnx from `sdca export --onnx CHECKPOINT -o MODEL.onnx --static-size WxH`\n";
    return 2;
  }
  const std::string &model = positional[0], &input = positional[1], &output = positional[2];
  try {
    sdca::Segmenter segmenter(model);
    const cv::Mat image = cv::imread(input, cv::IMREAD_COLOR);
    if (image.empty()) {
      std::cerr << "sdca_segment: " << input << ": cannot read the image\n";
      return 1;
    }
    const auto start = std::chrono::steady_clock::now();
    const cv::Mat labels = segmenter.segment(image);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!cv::imwrite(output, labels)) {
      std::cerr << "sdca_segment: " << output << ": cannot write\n";
      return 1;
    }
    if (!color_path.empty() && !cv::imwrite(color_path, segmenter.colorize(labels))) {
      std::cerr << "sdca_segment: " << color_path << ": cannot write\n";
      return 1;
    }
    std::cout << "sdca_segment: " << input << " -> " << output << " (" << image.cols << "x" << image.rows << ", "
              << segmenter.class_names().size() << " classes, " << ms << " ms)\n";
  } catch (const std::exception& e) {
    std::cerr << "sdca_segment: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
