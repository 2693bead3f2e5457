// SPDX-License-Identifier: MIT
// Runs polyak-mergekit on three of mergekit's example configs (SLERP with layer gradients, TIES with
// per-model density and weight gradients and filters, passthrough slices), as written but for the
// model paths, over small synthetic models laid out as Llama's; reads the outputs with a plain JSON
// and byte reader (not polyak's) and checks every tensor against its closed form, computed here.
// Then hostile configs and command lines: each refused with a message, and nothing written.
//   check_mergekit PATH_TO_polyak-mergekit WORK_FOLDER
#include <polyak/checkpoint/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <sys/wait.h>  // WIFEXITED: std::system's status

namespace {

namespace fs = std::filesystem;
int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  failures += !ok;
}

constexpr int layers = 4, hidden = 4, vocab = 6;

/// The tensors of a small Llama: name -> shape.
std::vector<std::pair<std::string, std::vector<std::int64_t>>> llama_tensors() {
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> t = {
      {"model.embed_tokens.weight", {vocab, hidden}}};
  for (int i = 0; i < layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    t.push_back({p + "self_attn.q_proj.weight", {hidden, hidden}});
    t.push_back({p + "mlp.up_proj.weight", {hidden, hidden}});
    t.push_back({p + "input_layernorm.weight", {hidden}});
  }
  t.push_back({"model.norm.weight", {hidden}});
  t.push_back({"lm_head.weight", {vocab, hidden}});
  return t;
}

/// A model folder: value(name, j) for element j of each tensor, a config.json and a tokenizer file,
/// as one safetensors file or two shards.
void make_model(const std::string& folder, const std::function<float(const std::string&, std::size_t)>& value,
                bool sharded) {
  fs::create_directories(folder);
  polyak::StateDict first, second;
  std::map<std::string, std::string> where;
  std::size_t index = 0;
  for (const auto& [name, shape] : llama_tensors()) {
    std::size_t n = 1;
    for (auto d : shape) n *= static_cast<std::size_t>(d);
    std::vector<float> x(n);
    for (std::size_t j = 0; j < n; ++j) x[j] = value(name, j);
    const bool later = sharded && index++ >= 6;
    (later ? second : first).insert(name, x.data(), shape);
    where[name] = later ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
  }
  first.metadata["format"] = second.metadata["format"] = "pt";
  if (sharded) {
    polyak::save_safetensors(folder + "/model-00001-of-00002.safetensors", first);
    polyak::save_safetensors(folder + "/model-00002-of-00002.safetensors", second);
    nlohmann::json index_json = {{"metadata", {{"total_size", 0}}}, {"weight_map", where}};
    std::ofstream(folder + "/model.safetensors.index.json") << index_json.dump(2);
  } else {
    polyak::save_safetensors(folder + "/model.safetensors", first);
  }
  std::ofstream(folder + "/config.json")
      << R"({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4})";
  std::ofstream(folder + "/tokenizer.json") << R"({"model": {"type": "BPE"}})";
}

/// An output read plainly: the index's weight map, each shard's JSON header, the bytes as float32.
struct Output {
  std::map<std::string, std::vector<float>> tensors;
  std::map<std::string, std::vector<std::int64_t>> shapes;
  std::vector<std::string> order;  // the index's weight map order
  bool ok = false;
};

Output read_output(const std::string& folder) {
  Output out;
  std::ifstream index_file(folder + "/model.safetensors.index.json");
  if (!index_file) return out;
  const nlohmann::ordered_json index =
      nlohmann::ordered_json::parse(index_file, nullptr, false);  // (its order)
  if (!index.is_object() || !index.contains("weight_map")) return out;
  std::map<std::string, nlohmann::json> headers;
  for (const auto& [name, shard] : index["weight_map"].items()) {
    out.order.push_back(name);
    const std::string path = folder + "/" + shard.get<std::string>();
    std::ifstream in(path, std::ios::binary);
    std::uint64_t length = 0;
    in.read(reinterpret_cast<char*>(&length), 8);
    std::string header(length, ' ');
    in.read(header.data(), static_cast<std::streamsize>(length));
    const nlohmann::json h = nlohmann::json::parse(header, nullptr, false);
    if (!h.contains(name) || h[name]["dtype"] != "F32") return out;
    const auto offsets = h[name]["data_offsets"].get<std::vector<std::uint64_t>>();
    std::vector<float> values((offsets[1] - offsets[0]) / 4);
    in.seekg(static_cast<std::streamoff>(8 + length + offsets[0]));
    in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(values.size() * 4));
    out.tensors[name] = values;
    out.shapes[name] = h[name]["shape"].get<std::vector<std::int64_t>>();
  }
  out.ok = true;
  return out;
}

bool close(double a, double b) { return std::abs(a - b) <= 1e-6 * std::max(1.0, std::abs(b)); }

/// mergekit's gradient at t: anchors interpolated linearly.
double gradient(const std::vector<double>& anchors, double t) {
  const double scaled = t * static_cast<double>(anchors.size() - 1);
  const auto i0 = static_cast<std::size_t>(scaled);
  const std::size_t i1 = std::min(anchors.size() - 1, i0 + 1);
  return (1 - (scaled - static_cast<double>(i0))) * anchors[i0] +
         (scaled - static_cast<double>(i0)) * anchors[i1];
}

int layer_of(const std::string& name) {
  const auto at = name.find("layers.");
  return at == std::string::npos ? -1 : std::stoi(name.substr(at + 7));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const std::string tool = argv[1], work = argv[2];
  fs::remove_all(work);
  fs::create_directories(work);
  const auto run = [&](const std::string& args) {
    return std::system((tool + " " + args + " >" + work + "/stdout.txt 2>" + work + "/stderr.txt").c_str());
  };
  const auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(work + "/" + name) << text;
    return work + "/" + name;
  };
  // Models: A(j) = 1 + j / 16 on every tensor; B = 2 A (parallel: slerp is linear, (1 - t) A + t B =
  // (1 + t) A); the base of TIES: 0; its models: task values with distinct magnitudes, j + 1 times
  // 1, 2 and -1.
  const std::string a = work + "/A", b = work + "/B", base = work + "/base", m1 = work + "/m1",
                    m2 = work + "/m2", m3 = work + "/m3";
  const auto base_value = [](const std::string&, std::size_t j) { return 1.0f + static_cast<float>(j) / 16; };
  make_model(a, base_value, false);
  make_model(
      b, [&](const std::string& n, std::size_t j) { return 2 * base_value(n, j); }, true);
  make_model(
      base, [](const std::string&, std::size_t) { return 0.0f; }, false);
  const double scales[3] = {1, 2, -1};
  for (int k = 0; k < 3; ++k) {
    make_model(
        work + "/m" + std::to_string(k + 1),
        [&, k](const std::string&, std::size_t j) {
          return static_cast<float>(scales[k] * static_cast<double>(j + 1));
        },
        false);
  }

  // 1. SLERP with layer gradients (mergekit's examples/gradient-slerp.yml, the paths ours).
  const std::string slerp = write(
      "slerp.yml", "slices:\n  - sources:\n      - model: " + a +
                       "\n        layer_range: [0, 4]\n      - model: " + b +
                       "\n        layer_range: [0, 4]\nmerge_method: slerp\nbase_model: " + a +
                       "\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                       "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
                       "    - value: 0.5 # fallback for rest of tensors\ndtype: float32\n");
  expect(run(slerp + " " + work + "/out_slerp") == 0, "the SLERP config runs");
  Output out = read_output(work + "/out_slerp");
  expect(out.ok && out.tensors.size() == llama_tensors().size(),
         "its output reads plainly, every tensor there");
  bool all = out.ok;
  for (const auto& [name, values] : out.tensors) {
    const int layer = layer_of(name);
    const double t_layer = layer < 0 ? 0 : static_cast<double>(layer) / (layers - 1);
    double t = 0.5;
    if (name.find("self_attn") != std::string::npos) t = gradient({0, 0.5, 0.3, 0.7, 1}, t_layer);
    if (name.find("mlp") != std::string::npos) t = gradient({1, 0.5, 0.7, 0.3, 0}, t_layer);
    for (std::size_t j = 0; j < values.size(); ++j)
      all = all && close(values[j], (1 + t) * base_value(name, j));
  }
  expect(all,
         "each tensor is (1 + t) A, t from its filter's gradient at its layer (0.433 for layer 1's q_proj)");
  expect(fs::exists(work + "/out_slerp/config.json") && fs::exists(work + "/out_slerp/tokenizer.json") &&
             fs::exists(work + "/out_slerp/mergekit_config.yml"),
         "the base model's config and tokenizer are copied, the config saved as mergekit_config.yml");

  // 2. TIES with per-model density and weight gradients and a filter (mergekit's examples/ties.yml).
  const std::string ties =
      write("ties.yml",
            "models:\n  - model: " + m1 +
                "\n    parameters:\n      density: [1, 0.7, 0.1] # density gradient\n      weight: 1.0\n"
                "  - model: " +
                m2 +
                "\n    parameters:\n      density: 0.5\n      weight: [0, 0.3, 0.7, 1] # weight gradient\n"
                "  - model: " +
                m3 +
                "\n    parameters:\n      density: 0.33\n      weight:\n        - filter: mlp\n"
                "          value: 0.5\n        - value: 0\nmerge_method: ties\nbase_model: " +
                base + "\nparameters:\n  normalize: true\n  int8_mask: true\ndtype: float32\n");
  expect(run(ties + " " + work + "/out_ties") == 0, "the TIES config runs");
  out = read_output(work + "/out_ties");
  all = out.ok && out.tensors.size() == llama_tensors().size();
  for (const auto& [name, values] : out.tensors) {
    const int layer = layer_of(name);
    const double t = layer < 0 ? (name.find("embed") != std::string::npos ? 0.0 : 1.0)
                               : static_cast<double>(layer) / (layers - 1);
    const double density[3] = {gradient({1, 0.7, 0.1}, t), 0.5, 0.33};
    const double weight[3] = {1.0, gradient({0, 0.3, 0.7, 1}, t),
                              name.find("mlp") != std::string::npos ? 0.5 : 0.0};
    const std::size_t n = values.size();
    for (std::size_t j = 0; j < n; ++j) {
      // Trim: magnitudes j + 1 grow with j, so model k keeps the last floor(d_k n) scalars.
      double kept[3], elect = 0;
      for (int k = 0; k < 3; ++k) {
        const auto keep = static_cast<std::size_t>(std::floor(density[k] * static_cast<double>(n)));
        kept[k] = j >= n - keep ? scales[k] * static_cast<double>(j + 1) : 0.0;
        elect += weight[k] * kept[k];
      }
      const double sign = elect >= 0 ? 1 : -1;
      double sum = 0, divisor = 0;
      for (int k = 0; k < 3; ++k) {
        if (weight[k] * kept[k] * sign > 0) {
          sum += weight[k] * kept[k];
          divisor += weight[k];
        }
      }
      const double expected = divisor == 0 ? 0 : sum / divisor;
      all = all && close(values[j], expected);
    }
  }
  expect(all, "each tensor is TIES' trimmed, elected, weighted mean, density and weight at its layer");

  // 3. Passthrough slices (mergekit's examples/orcamini-platypus-13b.yml): A's layers 0-1, then B's 1-3.
  const std::string pass = write(
      "passthrough.yml", "slices:\n  - sources:\n    - model: " + a +
                             "\n      layer_range: [0, 2]\n  - sources:\n    - model: " + b +
                             "\n      layer_range: [1, 4]\nmerge_method: passthrough\ndtype: float32\n");
  expect(run(pass + " " + work + "/out_pass") == 0, "the passthrough config runs");
  out = read_output(work + "/out_pass");
  all = out.ok && out.tensors.size() == 2 + 5 * 3 + 1;
  for (const auto& [name, values] : out.tensors) {
    const int layer = layer_of(name);
    // Layers 0-1 are A's (and so are the embeddings); 2-4 are B's 1-3 (and so are the norm and head).
    const bool from_b = layer >= 2 || (layer < 0 && name.find("embed") == std::string::npos);
    for (std::size_t j = 0; j < values.size(); ++j)
      all = all && values[j] == static_cast<float>((from_b ? 2 : 1) * base_value(name, j));
  }
  expect(all, "layers 0-1 are A's, 2-4 B's layers 1-3 renumbered, the embeddings A's and the head B's");
  std::ifstream config_in(work + "/out_pass/config.json");
  const nlohmann::json copied_config = nlohmann::json::parse(config_in, nullptr, false);
  expect(copied_config.is_object() && copied_config["num_hidden_layers"] == 5, "config.json says 5 layers");
  expect(out.ok && out.order.front() == "model.embed_tokens.weight" && out.order.back() == "lm_head.weight",
         "the index lists the embeddings first and the head last");

  // Shards: a 200-byte limit gives several, each tensor whole in one, the index naming them.
  expect(run("--shard-size 200 " + pass + " " + work + "/out_small") == 0 &&
             read_output(work + "/out_small").tensors.size() == 18,
         "--shard-size 200 runs, every tensor read back");
  {
    std::ifstream index_in(work + "/out_small/model.safetensors.index.json");
    const nlohmann::json index = nlohmann::json::parse(index_in, nullptr, false);
    std::map<std::string, std::pair<std::uint64_t, int>> shards;  // file -> bytes, tensors
    const Output small = read_output(work + "/out_small");
    for (const auto& [name, file] : index["weight_map"].items()) {
      auto& [bytes, count] = shards[file.get<std::string>()];
      bytes += small.tensors.at(name).size() * 4;
      ++count;
    }
    bool within = shards.size() > 1;
    for (const auto& [file, filled] : shards) within = within && (filled.first <= 200 || filled.second == 1);
    expect(within, "--shard-size 200: " + std::to_string(shards.size()) + " shards, each within 200 bytes");
  }

  // --dry-run: the plan printed, nothing written.
  expect(run("--dry-run " + ties + " " + work + "/out_dry") == 0 && !fs::exists(work + "/out_dry"),
         "--dry-run writes nothing");
  std::ifstream plan_in(work + "/stdout.txt");
  const std::string plan((std::istreambuf_iterator<char>(plan_in)), std::istreambuf_iterator<char>());
  expect(
      plan.find("model.layers.1.mlp.up_proj.weight F32 [4, 4]") != std::string::npos &&
          plan.find("ties weights 1 0.3 0.5 densities 0.8 0.5 0.33 normalize true") != std::string::npos &&
          plan.find("nothing written") != std::string::npos,
      "--dry-run prints each tensor's method and parameters at its layer (layer 1: weight 0.3, density 0.8)");

  // Hostile configs and command lines: refused with the problem named, nothing written.
  const auto refused = [&](const std::string& args, const std::string& why) {
    const std::string target = work + "/refused_out";
    const int status = run(args + " " + target);
    std::ifstream in(work + "/stderr.txt");
    const std::string message((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    const bool ok = code != 0 && message.find(why) != std::string::npos && !fs::exists(target);
    expect(ok, "refused, nothing written: " + why + " (exit " + std::to_string(code) + ")" +
                   (ok ? std::string() : ": " + message.substr(0, message.find('\n'))));
  };
  const auto config = [&](const std::string& text) { return write("hostile.yml", text); };
  const std::string models = "models:\n  - model: " + m1 + "\n    parameters:\n      weight: 1\n";
  refused(config(models + "merge_method: ties\nbase_model: " + base + "\ntokenizer_source: base\n"),
          "'tokenizer_source' is mergekit's, and polyak does not take it");
  refused(config(models + "merge_method: ties\nbase_model: " + base + "\nbogus: 1\n"),
          "'bogus' is not a key of it");
  refused(config(models + "merge_method: ties\nbase_model: " + base + "\nparameters:\n  gamma: 0.1\n"),
          "'gamma' is not a parameter of ties");
  refused(config("models:\n  - model: " + m1 + "\n    parameters:\n      weight: 1\n      normalize: true\n" +
                 "merge_method: ties\nbase_model: " + base + "\n"),
          "'normalize' is not a parameter of a model for ties");
  refused(config("models:\n  - model: " + m1 + "\nmerge_method: ties\nbase_model: " + base + "\n"),
          "no weight for");
  refused(config(models + "merge_method: slerp\nbase_model: " + base + "\n"),
          "'weight' is not a parameter of slerp");
  refused(config(models + "merge_method: arcee_fusion\n"),
          "merge_method 'arcee_fusion' is not a method polyak has");
  refused(config(models + "merge_method: linear\nbase_model: " + base + "\n"), "linear takes no base_model");
  refused(config(models + "merge_method: ties\n"), "ties needs a base_model");
  refused(config(models + "merge_method: linear\nparameters:\n  normalize: false\n"), "always normalizes");
  refused(config(models + "merge_method: ties\nbase_model: " + base + "\nparameters:\n  density: 1.5\n"),
          "density 1.5 is outside [0, 1]");
  refused(config(models + "merge_method: ties\nbase_model: " + base + "\nout_dtype: int8\n"),
          "out_dtype 'int8' is none of");
  refused(config("slices:\n  - sources:\n    - model: " + a +
                 "\n      layer_range: [0, 9]\nmerge_method: passthrough\n"),
          "has no layer 4");
  refused(config("slices:\n  - sources:\n    - model: " + a + "\n      layer_range: [0, 2]\n    - model: " +
                 b + "\n      layer_range: [0, 2]\nmerge_method: passthrough\n"),
          "passthrough takes one source a slice, not 2");
  refused(config("slices:\n  - sources:\n    - model: " + a +
                 "\n      layer_range: [2, 1]\nmerge_method: passthrough\n"),
          "needs first < end");
  refused(config("slices:\n  - sources:\n    - model: " + a +
                 "\n      layer_range: [-0, 2]\nmerge_method: passthrough\n"),
          "a layer_range bound '-0' is not a whole number >= 0");
  refused(config("slices:\n  - sources:\n    - model: " + a +
                 "\n      layer_range: [01, 3]\nmerge_method: passthrough\n"),
          "a layer_range bound '01': a number YAML 1.1 (mergekit's reader) reads otherwise");
  refused(config(models + "merge_method: ties\nbase_model: " + base + "\nmodels: []\n"),
          "'models' appears twice");
  refused(config("models:\n  - model: " + m1 + "\n    parameters:\n      weight: 1\n      weight: 2\n" +
                 "merge_method: ties\nbase_model: " + base + "\n"),
          "'weight' appears twice");
  refused(config("merge_method: ties\n"), "exactly one of models and slices");
  refused(config(models + "slices: []\nmerge_method: ties\nbase_model: " + base + "\n"),
          "exactly one of models and slices");
  // A model that lacks a tensor the others have.
  make_model(
      work + "/short", [](const std::string&, std::size_t) { return 1.0f; }, false);
  {
    polyak::StateDict sd = polyak::load_safetensors(work + "/short/model.safetensors");
    polyak::StateDict fewer;
    for (const auto& [name, tensor] : sd) {
      if (name != "lm_head.weight") fewer.insert(name, tensor.owned());
    }
    polyak::save_safetensors(work + "/short/model.safetensors", fewer);
  }
  refused(config(models + "  - model: " + work +
                 "/short\n    parameters:\n      weight: 1\nmerge_method: ties\nbase_model: " + base + "\n"),
          "has no tensor 'lm_head.weight'");
  refused("--shard-size 0 " + pass, "--shard-size '0' is not a whole number >= 1");
  refused("--shard-size 9 --shard-size 9 " + pass, "--shard-size is given twice");
  refused("--num-threads 65 " + pass, "--num-threads '65' is not a whole number in [0, 64]");
  refused("--num-threads -1 " + pass, "--num-threads '-1' is not a whole number in [0, 64]");
  refused("--num-threads -0 " + pass, "--num-threads '-0' is not a whole number in [0, 64]");
  refused("--num-threads 2 --num-threads 2 " + pass, "--num-threads is given twice");
  refused("--num-threads 1.5 " + pass, "--num-threads '1.5' is not a whole number in [0, 64]");
  refused("--bogus " + pass, "unknown option '--bogus'");
  refused(work + "/missing.yml", "cannot read");
  // OUT an existing folder of the user's: refused, its files kept; OUT an input: refused.
  fs::create_directories(work + "/users");
  std::ofstream(work + "/users/notes.txt") << "mine";
  expect(run(pass + " " + work + "/users") != 0 && fs::exists(work + "/users/notes.txt") &&
             !fs::exists(work + "/users/model.safetensors.index.json"),
         "an OUT folder holding a file of the user's is refused and kept");
  expect(run(pass + " " + a) != 0 && fs::exists(a + "/model.safetensors") &&
             !fs::exists(a + "/mergekit_config.yml"),
         "OUT = an input model's folder is refused, the model kept");
  // A second run into the same OUT (an earlier merge's output) replaces it whole.
  expect(run(pass + " " + work + "/out_slerp") == 0 && read_output(work + "/out_slerp").tensors.size() == 18,
         "an earlier merge's output is replaced whole by the next merge");

  // The hostile pass's cases (issue 24, item 2).
  refused(
      config("models:\n  - model: " + m1 +
             "\n    parameters:\n      weight: &a [{filter: embed, value: *a}]\n" + "merge_method: linear\n"),
      "nests filters deeper than 16 levels");
  refused(config(models + "merge_method: linear\n---\nmerge_method: ties\n"), "2 YAML documents, not one");
  refused(config("models:\n  - model: " + m1 + "\n    parameters:\n      weight: 010\n" +
                 "merge_method: linear\n"),
          "'010': a number YAML 1.1 (mergekit's reader) reads otherwise");
  refused(config(models + "merge_method: ties\nbase_model: " + base + "\nparameters:\n  normalize: yes\n"),
          "'yes': write true or false");
  refused(config(models + "  - model: " + m1 + "/model.safetensors\n    parameters:\n      weight: 1\n" +
                 "merge_method: linear\n"),
          "is listed twice in models");  // a folder and its file: one model
  {  // the dry run checks OUT as the run would: an input's folder is refused
    const int status = run("--dry-run " + pass + " " + a);
    std::ifstream in(work + "/stderr.txt");
    const std::string message((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    expect(status != 0 && message.find("which writing it would destroy") != std::string::npos,
           "--dry-run refuses an OUT that is an input's folder, as the run would");
  }
  // filter: null is mergekit's None: it applies to every tensor (A + 3 (2 A)) / 4 = 7 A / 4.
  const std::string null_filter =
      write("null_filter.yml",
            "models:\n  - model: " + a + "\n    parameters:\n      weight:\n        - filter: null\n" +
                "          value: 1\n  - model: " + b + "\n    parameters:\n      weight: 3\n" +
                "merge_method: linear\ndtype: float32\n");
  expect(run(null_filter + " " + work + "/out_null") == 0, "filter: null applies to every tensor");
  out = read_output(work + "/out_null");
  all = out.ok && !out.tensors.empty();
  for (const auto& [name, values] : out.tensors) {
    for (std::size_t j = 0; j < values.size(); ++j) all = all && close(values[j], 1.75 * base_value(name, j));
  }
  expect(all, "and the merge is (A + 3 (2 A)) / 4 = 7 A / 4 everywhere");
  // NuSLERP of parallel models (B = 2 A) is linear: t = 3 / 4, A / 4 + 3 (2 A) / 4 = 7 A / 4.
  const std::string nuslerp = write(
      "nuslerp.yml", "models:\n  - model: " + a + "\n    parameters:\n      weight: 1\n" + "  - model: " + b +
                         "\n    parameters:\n      weight: 3\n" + "merge_method: nuslerp\ndtype: float32\n");
  expect(run(nuslerp + " " + work + "/out_nuslerp") == 0, "a nuslerp config runs");
  out = read_output(work + "/out_nuslerp");
  all = out.ok && !out.tensors.empty();
  for (const auto& [name, values] : out.tensors) {
    for (std::size_t j = 0; j < values.size(); ++j) all = all && close(values[j], 1.75 * base_value(name, j));
  }
  expect(all, "and gives 7 A / 4 (parallel models: linear at t = 3 / 4)");
  // Multi-SLERP of the same: direction A's, norm (|A| + 3 |2 A|) / 4: 7 A / 4 again. Karcher (equal
  // weights): direction A's, norm the mean of |A| and |2 A|: 3 A / 2. A weight for karcher: refused.
  const std::string multislerp =
      write("multislerp.yml", "models:\n  - model: " + a + "\n    parameters:\n      weight: 1\n" +
                                  "  - model: " + b + "\n    parameters:\n      weight: 3\n" +
                                  "merge_method: multislerp\nparameters:\n  eps: 1e-9\ndtype: float32\n");
  expect(run(multislerp + " " + work + "/out_multislerp") == 0, "a multislerp config runs");
  out = read_output(work + "/out_multislerp");
  all = out.ok && !out.tensors.empty();
  for (const auto& [name, values] : out.tensors) {
    for (std::size_t j = 0; j < values.size(); ++j) all = all && close(values[j], 1.75 * base_value(name, j));
  }
  expect(all, "and gives 7 A / 4");
  const std::string karcher =
      write("karcher.yml", "models:\n  - model: " + a + "\n  - model: " + b +
                               "\nmerge_method: karcher\nparameters:\n  max_iter: 5\n" +
                               "  tol: 1e-7\ndtype: float32\n");
  expect(run(karcher + " " + work + "/out_karcher") == 0, "a karcher config runs");
  out = read_output(work + "/out_karcher");
  all = out.ok && !out.tensors.empty();
  for (const auto& [name, values] : out.tensors) {
    for (std::size_t j = 0; j < values.size(); ++j) all = all && close(values[j], 1.5 * base_value(name, j));
  }
  expect(all, "and gives 3 A / 2");
  const std::string weighted_karcher =
      write("weighted_karcher.yml", "models:\n  - model: " + a + "\n    parameters:\n      weight: 1\n" +
                                        "  - model: " + b + "\nmerge_method: karcher\n");
  const auto said = [&](const std::string& text) {
    std::ifstream in(work + "/stderr.txt");
    const std::string all_text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return all_text.find(text) != std::string::npos;
  };
  expect(run(weighted_karcher + " " + work + "/out_weighted_karcher") != 0 && said("weight") &&
             !fs::exists(work + "/out_weighted_karcher"),
         "a weight given to karcher (which weights equally) is refused, nothing written");
  const std::string fractional =
      write("fractional.yml", "models:\n  - model: " + a + "\n  - model: " + b +
                                  "\nmerge_method: karcher\nparameters:\n  max_iter: 2.5\n");
  expect(run(fractional + " " + work + "/out_fractional") != 0 && said("max_iter") &&
             !fs::exists(work + "/out_fractional"),
         "max_iter 2.5 is refused, nothing written");
  // Zero-padded layer numbers ("layers.00."): found by number, renumbered plainly.
  {
    polyak::StateDict padded;
    const float w[2] = {1, 2}, v[2] = {3, 4};
    padded.insert("model.layers.00.w", w, {2});
    padded.insert("model.layers.01.w", v, {2});
    fs::create_directories(work + "/padded");
    polyak::save_safetensors(work + "/padded/model.safetensors", padded);
  }
  const std::string padded_config =
      write("padded.yml", "slices:\n  - sources:\n    - model: " + work +
                              "/padded\n      layer_range: [1, 2]\n" + "  - sources:\n    - model: " + work +
                              "/padded\n      layer_range: [0, 1]\n" + "merge_method: passthrough\n");
  out = Output();
  expect(run(padded_config + " " + work + "/out_padded") == 0 &&
             (out = read_output(work + "/out_padded")).ok &&
             out.tensors["model.layers.0.w"] == std::vector<float>{3, 4} &&
             out.tensors["model.layers.1.w"] == std::vector<float>{1, 2},
         "zero-padded layers: layer 01 becomes layer 0, layer 00 layer 1");
  // An OUT that holds a model of the user's, even one with a mergekit_config.yml (a merged model
  // downloaded): refused, kept. An earlier output with a file the user added: refused, kept.
  fs::create_directories(work + "/downloaded");
  fs::copy_file(a + "/model.safetensors", work + "/downloaded/model.safetensors");
  std::ofstream(work + "/downloaded/mergekit_config.yml") << "merge_method: slerp\n";
  expect(run(pass + " " + work + "/downloaded") != 0 && fs::exists(work + "/downloaded/model.safetensors"),
         "an OUT holding a downloaded merged model (with its mergekit_config.yml) is refused and kept");
  std::ofstream(work + "/out_slerp/my_notes.txt") << "mine";
  expect(run(pass + " " + work + "/out_slerp") != 0 && fs::exists(work + "/out_slerp/my_notes.txt") &&
             fs::exists(work + "/out_slerp/model.safetensors.index.json"),
         "an earlier output with a file the user added is refused, the file kept");

  fs::remove_all(work);
  return failures == 0 ? 0 : 1;
}
