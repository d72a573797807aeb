// A semantic segmenter over an ONNX model exported by `sdca export --onnx ... --static-size WxH`, run with
// OpenCV's DNN module. The example a C++ stack copies: construct once, call segment() per frame.
#pragma once

#include <array>
#include <string>
#include <vector>

#include <opencv2/core.hpp>
#include <opencv2/dnn.hpp>

namespace sdca {

class Segmenter {
 public:
  // Throws std::runtime_error naming the file when it cannot be read or lacks the sdca metadata.
  explicit Segmenter(const std::string& model_path);

  // BGR 8-bit frame of any size (as cv::imread gives it) -> CV_8U label map of the same size (class indices).
  cv::Mat segment(const cv::Mat& bgr);

  // A label map in the model's palette, as BGR for cv::imwrite.
  cv::Mat colorize(const cv::Mat& labels) const;

  const std::vector<std::string>& class_names() const { return class_names_; }
  cv::Size input_size() const { return input_size_; }

 private:
  cv::dnn::Net net_;
  cv::Size input_size_;
  std::array<float, 3> mean_{}, std_{};
  float scale_ = 1.f;
  bool rgb_ = true;
  bool probabilities_ = false;
  std::vector<std::string> class_names_;
  std::vector<cv::Vec3b> palette_bgr_;
};

}  // namespace sdca
