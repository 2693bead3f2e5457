// SPDX-License-Identifier: MIT
// A user's program: SWA over a tiny model. Linked with the checkpoint layer (CONSUMER_SAVES) it also
// writes two checkpoints for the installed polyak-merge to average (`consumer write FOLDER`), and
// checks the tool's output (`consumer check FILE`). Linked with polyak::c10d (CONSUMER_C10D) it also
// averages over a Gloo process group of one; with polyak::dlib (CONSUMER_DLIB), the SWA of a dlib net.
#include <polyak/polyak.hpp>
#ifdef CONSUMER_SAVES
#include <polyak/checkpoint.hpp>
#endif
#ifdef CONSUMER_C10D
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <polyak/torch/c10d.hpp>
#endif
#ifdef CONSUMER_DLIB
#include <polyak/dlib.hpp>
#endif

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
#ifdef CONSUMER_SAVES
  if (argc == 3 && std::string(argv[1]) == "write") {  // w = {1, 2, 3} and {3, 4, 5}
    for (const float first : {1.0f, 3.0f}) {
      const std::vector<float> w = {first, first + 1, first + 2};
      polyak::StateDict sd;
      sd.insert("w", w.data(), {3});
      polyak::save_safetensors(std::string(argv[2]) + (first == 1.0f ? "/a.safetensors" : "/b.safetensors"),
                               sd);
    }
    return 0;
  }
  if (argc == 3 && std::string(argv[1]) == "check") {  // their average, {2, 3, 4}
    const auto merged = polyak::to_doubles(polyak::load_safetensors(argv[2]).at("w"));
    std::cout << "consumer: polyak-merge wrote " << merged[0] << " " << merged[1] << " " << merged[2] << "\n";
    return merged == std::vector<double>{2, 3, 4} ? 0 : 1;
  }
#endif
  if (argc != 1) {
    std::cerr << "consumer: unknown arguments\n";
    return 2;
  }
  Eigen::VectorXf w = Eigen::VectorXf::Zero(3);
  polyak::ParameterList<float> model;
  model.add("w", w);
  polyak::AveragedModel<float> swa(model);
  for (int step = 1; step <= 4; ++step) {
    w.setConstant(static_cast<float>(step));
    swa.update_parameters(model);
  }
  const float mean = swa.parameters()[0].data()[0];  // (1 + 2 + 3 + 4) / 4
#ifdef CONSUMER_C10D
  // A Gloo group of one process: its average is the model itself.
  auto comm = polyak::libtorch::C10dCommunicator::gloo(c10::make_intrusive<c10d::HashStore>(), 0, 1);
  swa.copy_to(model);
  polyak::average_parameters(model, comm);
  std::cout << "consumer: averaged over a Gloo group of " << comm.size() << "\n";
  if (w[1] != 2.5f) return 1;
#endif
#ifdef CONSUMER_DLIB
  // A dlib net of one fully connected layer, set up by one forward pass: its average over two
  // settings of its weights.
  dlib::fc<2, dlib::input<dlib::matrix<float, 0, 1>>> net;
  net(dlib::matrix<float, 0, 1>(3));
  const auto params = polyak::dlib_dnn::parameters(net);
  polyak::AveragedModel<float> net_swa(params);
  for (const float value : {1.0f, 4.0f}) {
    dlib::layer<0>(net).layer_details().get_layer_params() = value;
    net_swa.update_parameters(params);
  }
  net_swa.copy_to(params);
  std::cout << "consumer: the SWA of a dlib net's " << params[0].numel() << " parameters\n";
  if (params[0].data()[0] != 2.5f) return 1;
#endif
  std::cout << "consumer: SWA mean " << mean << "\n";
#ifdef CONSUMER_SAVES
  if (swa.state_dict().scalar<std::int64_t>("n_averaged") != 4) return 1;
#endif
  return mean == 2.5f ? 0 : 1;
}
