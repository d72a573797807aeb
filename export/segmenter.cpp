#include "segmenter.hpp"

#include <stdexcept>

#include <opencv2/imgproc.hpp>

#include "onnx_metadata.hpp"

namespace sdca {

namespace {

std::vector<std::string> string_list(const std::string& json) {
  // The class names: a JSON array of plain strings (names hold no quotes or escapes).
  std::vector<std::string> out;
  size_t pos = 0;
  while ((pos = json.find('"', pos)) != std::string::npos) {
    const size_t end = json.find('"', pos + 1);
    if (end == std::string::npos) break;
    out.push_back(json.substr(pos + 1, end - pos - 1));
    pos = end + 1;
  }
  return out;
}

const std::string& require(const std::map<std::string, std::string>& props, const std::string& key,
                           const std::string& path) {
  auto it = props.find(key);
  if (it == props.end())
    throw std::runtime_error(path + ": no '" + key + "' in the model metadata; export it with `sdca export --onnx`" +
                             (key == "input_size" ? " and --static-size WxH" : ""));
  return it->second;
}

}  // namespace

Segmenter::Segmenter(const std::string& model_path) {
  const auto props = read_onnx_metadata(model_path);
  const auto precision = props.find("precision");
  if (precision != props.end() && precision->second == "int8")
    // OpenCV's ONNX importer (4.6) rejects the QDQ pairs ONNX Runtime's quantizer writes (per-channel weights).
    throw std::runtime_error(model_path +
                             ": an INT8 (QDQ) model, which OpenCV's DNN module cannot import; run it "
                             "with ONNX Runtime (its C++ API, or `sdca infer` / `sdca serve`) or TensorRT, or "
                             "export a float32 model for this consumer");
  const auto size = number_list(require(props, "input_size", model_path));
  if (size.size() != 2)
    throw std::runtime_error(model_path +
                             ": the model takes any input size; export it with --static-size WxH for "
                             "OpenCV's DNN module, which needs fixed shapes");
  input_size_ = cv::Size(static_cast<int>(size[0]), static_cast<int>(size[1]));
  const auto mean = number_list(require(props, "mean", model_path));
  const auto stdev = number_list(require(props, "std", model_path));
  if (mean.size() != 3 || stdev.size() != 3) throw std::runtime_error(model_path + ": mean and std need 3 values");
  for (int c = 0; c < 3; ++c) {
    mean_[c] = static_cast<float>(mean[c]);
    std_[c] = static_cast<float>(stdev[c]);
  }
  scale_ = static_cast<float>(number_list(require(props, "scale", model_path)).at(0));
  rgb_ = require(props, "channel_order", model_path) != "BGR";
  const std::string output = require(props, "output", model_path);
  if (output == "labels")
    throw std::runtime_error(model_path + ": exported with --output labels; export logits or probs for this consumer");
  probabilities_ = output == "probs";
  class_names_ = string_list(require(props, "class_names", model_path));
  const auto palette = number_list(require(props, "palette", model_path));
  for (size_t i = 0; i + 2 < palette.size(); i += 3)
    palette_bgr_.emplace_back(static_cast<uchar>(palette[i + 2]), static_cast<uchar>(palette[i + 1]),
                              static_cast<uchar>(palette[i]));
  net_ = cv::dnn::readNetFromONNX(model_path);
  net_.setPreferableBackend(cv::dnn::DNN_BACKEND_OPENCV);
  net_.setPreferableTarget(cv::dnn::DNN_TARGET_CPU);
}

cv::Mat Segmenter::segment(const cv::Mat& bgr) {
  if (bgr.empty() || bgr.type() != CV_8UC3) throw std::invalid_argument("segment() takes a non-empty 8-bit BGR image");
  cv::Mat frame = bgr;
  if (frame.size() != input_size_) cv::resize(bgr, frame, input_size_, 0, 0, cv::INTER_LINEAR);
  const int h = input_size_.height, w = input_size_.width;
  // NCHW float blob: ((pixel / 255) * scale - mean) / std per channel, in the model's channel order.
  cv::Mat blob(std::vector<int>{1, 3, h, w}, CV_32F);
  float* planes = blob.ptr<float>();
  for (int y = 0; y < h; ++y) {
    const cv::Vec3b* row = frame.ptr<cv::Vec3b>(y);
    for (int x = 0; x < w; ++x) {
      for (int c = 0; c < 3; ++c) {
        const int source = rgb_ ? 2 - c : c;  // OpenCV frames are BGR
        const float v = row[x][source] / 255.f * scale_;
        planes[(static_cast<size_t>(c) * h + y) * w + x] = (v - mean_[c]) / std_[c];
      }
    }
  }
  net_.setInput(blob);
  const cv::Mat scores = net_.forward();  // [1, K, h, w]
  if (scores.dims != 4 || scores.size[2] != h || scores.size[3] != w)
    throw std::runtime_error("the model's output is not [1, K, H, W] at the input size");
  const int k = scores.size[1];
  const float* s = scores.ptr<float>();
  const size_t plane = static_cast<size_t>(h) * w;
  cv::Mat labels(h, w, CV_8U);
  for (size_t i = 0; i < plane; ++i) {
    int best = 0;
    float best_score = s[i];
    for (int c = 1; c < k; ++c) {
      const float v = s[c * plane + i];
      if (v > best_score) best_score = v, best = c;  // first maximum wins, as numpy's argmax
    }
    labels.data[i] = static_cast<uchar>(best);
  }
  (void)probabilities_;  // argmax is the same for logits and probabilities
  if (labels.size() != bgr.size()) cv::resize(labels, labels, bgr.size(), 0, 0, cv::INTER_NEAREST);
  return labels;
}

cv::Mat Segmenter::colorize(const cv::Mat& labels) const {
  cv::Mat out(labels.size(), CV_8UC3, cv::Scalar(0, 0, 0));
  for (int y = 0; y < labels.rows; ++y)
    for (int x = 0; x < labels.cols; ++x) {
      const uchar l = labels.at<uchar>(y, x);
      if (l < palette_bgr_.size()) out.at<cv::Vec3b>(y, x) = palette_bgr_[l];
    }
  return out;
}

}  // namespace sdca
