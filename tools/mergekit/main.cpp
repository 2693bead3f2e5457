// SPDX-License-Identifier: MIT
// polyak-mergekit: runs a mergekit YAML config over local checkpoints (safetensors files or Hugging
// Face folders, sharded or not) and writes a Hugging Face folder, streamed, in little memory
// (polyak/checkpoint/merge_plan.hpp).
//
//   polyak-mergekit [--dry-run] [--shard-size BYTES] CONFIG OUT
//
// The config as mergekit reads it: merge_method, base_model, models (each a model path and its
// parameters) or slices (each a list of sources: a model path, a layer_range [first, end) and
// parameters), parameters, dtype and out_dtype. A parameter is a number (or true/false), a
// gradient over the layers (a list: layer i of n reads it at t = i / (n - 1), interpolated between
// neighbours; the embeddings at t = 0, the final norm and head at t = 1), or a list of
// {filter, value} tried in order (the first whose filter is a substring of the tensor's name, or
// has none, or is "*"). A per-model parameter is looked up in the model's (or source's) block, then
// the slice's, then the config's; a method parameter in the slice's, then the config's. Layers are
// the tensors named PREFIX.layers.N.REST (Llama's model.layers.N); slices renumber them in order.
// OUT gets shards of at most BYTES (default 5 GB, mergekit's), model.safetensors.index.json, the
// base model's (else the first model's) other files (config.json with num_hidden_layers set to the
// output's layer count, tokenizer files), and the config as mergekit_config.yml. Every floating
// tensor is computed in double and rounded once to out_dtype (else dtype, else its own dtype).
// Refused, with the key named and nothing written: a key mergekit has that polyak does not take
// (tokenizer_source, tokenizer, chat_template, modules), a key neither knows, a parameter the method
// does not use, a model's tensor set that differs from the others'. --dry-run prints the plan
// (tensors, method, parameters per tensor, output size) and writes nothing.
#include "../common/number.hpp"
#include <polyak/checkpoint/checkpoint_order.hpp>  // detail::visible
#include <polyak/checkpoint/merge_plan.hpp>

#include <yaml-cpp/yaml.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace {

namespace fs = std::filesystem;
using polyak::MergeMethod;

const char* const usage_text =
    "usage: polyak-mergekit [--dry-run] [--shard-size BYTES] [--num-threads N] CONFIG OUT\n"
    "  runs the mergekit config CONFIG (YAML) over local checkpoints and writes the Hugging Face\n"
    "  folder OUT (written only if all goes well)\n"
    "  --dry-run         print the plan (tensors, methods, parameters, output size); write nothing\n"
    "  --shard-size B    the largest shard, in bytes (default 5000000000, mergekit's 5B)\n"
    "  --num-threads N   the threads that merge a tensor's pieces, in [0, 64] (default 0: the\n"
    "                    machine's, at most 4); the bytes written do not depend on it\n"
    "  methods: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,\n"
    "  breadcrumbs_ties, della, della_linear, model_stock, nearswap, sce, slerp, nuslerp, multislerp,\n"
    "  karcher, passthrough\n";

/// A config or command line that cannot be run: the message, the usage, exit 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A parameter's value for one tensor: a number or true/false.
using Value = std::variant<double, bool>;

std::string where_of(const YAML::Node& node) {
  const YAML::Mark mark = node.Mark();
  return mark.is_null() ? std::string() : " (line " + std::to_string(mark.line + 1) + ")";
}

/// A scalar's value: a number, or true/false.
Value scalar_value(const YAML::Node& node, const std::string& what) {
  if (!node.IsScalar()) throw UsageError(what + " is not a number or true/false" + where_of(node));
  const std::string text = node.Scalar();
  if (text == "true" || text == "false") return text == "true";
  // Where YAML 1.1 (PyYAML, mergekit's reader) and 1.2 (yaml-cpp's) read a scalar otherwise, it is
  // refused, so that a config never merges otherwise here than in mergekit: "010" (octal 8 in
  // 1.1), "+2", "1_000", and true/false spelled "yes", "on", "True" and the like.
  static const std::set<std::string> other_truths = {"y",  "Y",  "yes", "Yes",  "YES",  "n",     "N",
                                                     "no", "No", "NO",  "True", "TRUE", "False", "FALSE",
                                                     "on", "On", "ON",  "off",  "Off",  "OFF"};
  if (other_truths.count(text))
    throw UsageError(what + " '" + text + "': write true or false (YAML readers differ on it)" +
                     where_of(node));
  const std::size_t digits = text.find_first_not_of("+-");
  const bool leading_zero = digits != std::string::npos && digits + 1 < text.size() && text[digits] == '0' &&
                            text[digits + 1] >= '0' && text[digits + 1] <= '9';
  if (leading_zero || text.find('_') != std::string::npos || (!text.empty() && text[0] == '+')) {
    throw UsageError(what + " '" + polyak::detail::visible(text) +
                     "': a number YAML 1.1 (mergekit's reader) reads otherwise; write it plainly" +
                     where_of(node));
  }
  double value = 0;
  if (!polyak_tools::parse_number(text, value) || !std::isfinite(value))
    throw UsageError(what + " '" + polyak::detail::visible(text) + "' is not a finite number or true/false" +
                     where_of(node));
  return value;
}

/// mergekit's evaluate_setting: the value of a parameter setting for a tensor named `name` at layer
/// position t (see the file comment); none where no conditional applies.
std::optional<Value> evaluate(const YAML::Node& setting, const std::string& name, double t,
                              const std::string& what, int depth = 0) {
  if (depth > 16) throw UsageError(what + " nests filters deeper than 16 levels (an alias to itself?)");
  if (setting.IsScalar()) return scalar_value(setting, what);
  if (!setting.IsSequence() || setting.size() == 0)
    throw UsageError(what + " is neither a value, a gradient nor a list of filters" + where_of(setting));
  const bool scalars =
      std::all_of(setting.begin(), setting.end(), [](const YAML::Node& n) { return n.IsScalar(); });
  if (scalars) {
    std::vector<Value> values;
    for (const auto& n : setting) values.push_back(scalar_value(n, what));
    const bool numbers = std::all_of(values.begin(), values.end(),
                                     [](const Value& v) { return std::holds_alternative<double>(v); });
    const double scaled = t * static_cast<double>(values.size() - 1);
    const auto i0 = static_cast<std::size_t>(scaled);
    if (!numbers) return values[i0];
    const std::size_t i1 = std::min(values.size() - 1, i0 + 1);
    const double fraction = scaled - static_cast<double>(i0);
    return (1 - fraction) * std::get<double>(values[i0]) + fraction * std::get<double>(values[i1]);
  }
  for (const auto& condition : setting) {
    if (!condition.IsMap())
      throw UsageError(what + ": a list mixes values and filters" + where_of(condition));
    std::set<std::string> seen;
    for (const auto& entry : condition) {
      const std::string key = entry.first.as<std::string>();
      if (!seen.insert(key).second)
        throw UsageError(what + ": '" + key + "' appears twice" + where_of(entry.first));
      if (key != "filter" && key != "value")
        throw UsageError(what + ": '" + polyak::detail::visible(key) + "' is not filter or value" +
                         where_of(entry.first));
    }
    if (!condition["value"]) throw UsageError(what + ": a filter without a value" + where_of(condition));
    const YAML::Node filter = condition["filter"];
    const bool none = !filter || filter.IsNull();  // (mergekit's filter None: every tensor)
    if (!none && !filter.IsScalar()) throw UsageError(what + ": a filter is not a name" + where_of(filter));
    const std::string text = none ? std::string() : filter.Scalar();
    if (none || text == "*" || name.find(text) != std::string::npos)
      return evaluate(condition["value"], name, t, what, depth + 1);
  }
  return std::nullopt;
}

/// The parameters each method takes: per model (mergekit's tensor parameters) and per method.
struct ParameterNames {
  std::set<std::string> per_model, per_method;
};

ParameterNames parameters_of(MergeMethod m) {
  const polyak::Sparsification sparsify = polyak::sparsification_of(m);
  ParameterNames p;
  if (m == MergeMethod::Average) p = {{"weight"}, {"normalize"}};
  if (polyak::is_task_vector_method(m)) {
    p = {{"weight"}, {"int8_mask", "normalize", "lambda"}};
    if (sparsify != polyak::Sparsification::None) {
      p.per_model.insert("density");
      p.per_method.insert("rescale");
    }
    if (sparsify == polyak::Sparsification::Outliers) p.per_model.insert("gamma");
    if (sparsify == polyak::Sparsification::RankSampling) p.per_model.insert("epsilon");
  }
  if (m == MergeMethod::Slerp || m == MergeMethod::NearSwap) p.per_method = {"t"};
  if (m == MergeMethod::ModelStock) p.per_method = {"filter_wise"};
  if (m == MergeMethod::Sce) p.per_method = {"int8_mask", "select_topk"};
  if (m == MergeMethod::NuSlerp) p = {{"weight"}, {"nuslerp_flatten", "nuslerp_row_wise"}};
  if (m == MergeMethod::MultiSlerp) p = {{"weight"}, {"normalize_weights", "eps"}};
  if (m == MergeMethod::Karcher) p.per_method = {"max_iter", "tol"};
  return p;
}

/// A checkpoint read by the plan, and its tensors split into layers and the rest.
struct Model {
  std::string path;                                        // as given
  std::vector<polyak::detail::FileId> key;                 // its data files' identities, sorted
  std::size_t index = 0;                                   // into the plan's checkpoints
  std::vector<std::string> names;                          // every tensor, in order
  std::map<std::string, polyak::DType> dtypes;             // by name
  std::map<std::size_t, std::vector<std::string>> layers;  // layer number -> its tensors' names
  std::vector<std::string> others;                         // tensors of no layer
};

/// Where a name has ".layers.N." (or starts "layers.N."): the prefix's end, N, the rest's start.
bool layer_of(const std::string& name, std::size_t& prefix_end, std::size_t& layer, std::size_t& rest) {
  for (std::size_t at = name.find("layers."); at != std::string::npos; at = name.find("layers.", at + 1)) {
    if (at != 0 && name[at - 1] != '.') continue;
    std::size_t digits = at + 7, end = digits;
    while (end < name.size() && name[end] >= '0' && name[end] <= '9') ++end;
    if (end == digits || end >= name.size() || name[end] != '.' || end - digits > 9) continue;
    prefix_end = at;
    layer = static_cast<std::size_t>(std::stoul(name.substr(digits, end - digits)));
    rest = end + 1;
    return true;
  }
  return false;
}

std::string renumbered(const std::string& name, std::size_t layer) {
  std::size_t prefix_end = 0, old = 0, rest = 0;
  layer_of(name, prefix_end, old, rest);
  return name.substr(0, prefix_end) + "layers." + std::to_string(layer) + "." + name.substr(rest);
}

struct Source {
  Model* model = nullptr;
  std::size_t first = 0, end = 0;  // layer_range
  YAML::Node parameters;
};

struct Slice {
  std::vector<Source> sources;
  YAML::Node parameters;
};

class Planner {
 public:
  explicit Planner(const YAML::Node& root) : root_(root) {}

  polyak::MergePlan plan(std::vector<std::string>& notes) {
    check_keys(root_, {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"},
               {"tokenizer_source", "tokenizer", "chat_template", "modules"}, "the config");
    const std::string method_name = required_string(root_, "merge_method");
    if (method_name == "dare")
      throw UsageError("merge_method dare is polyak's, not mergekit's: dare_linear or dare_ties");
    if (!polyak::merge_method_named(method_name, method_))
      throw UsageError("merge_method '" + polyak::detail::visible(method_name) +
                       "' is not a method polyak has");
    names_ = parameters_of(method_);
    check_parameter_block(root_["parameters"], "parameters", true);
    out_dtype_ = dtype_named(root_["out_dtype"], "out_dtype");
    if (!out_dtype_) out_dtype_ = dtype_named(root_["dtype"], "dtype");
    if (root_["dtype"])
      notes.push_back("dtype " + root_["dtype"].as<std::string>() +
                      ": polyak computes in double and rounds once to the output's dtype");
    const bool has_models = static_cast<bool>(root_["models"]),
               has_slices = static_cast<bool>(root_["slices"]);
    if (has_models == has_slices) throw UsageError("the config needs exactly one of models and slices");
    if (root_["base_model"]) base_ = &model(required_string(root_, "base_model"));
    if (base_ && !polyak::needs_base(method_) && !polyak::takes_optional_base(method_) &&
        method_ != MergeMethod::Slerp)
      throw UsageError("merge_method " + method_name + " takes no base_model");
    if (!base_ && polyak::needs_base(method_) && method_ != MergeMethod::Slerp)
      throw UsageError("merge_method " + method_name + " needs a base_model");
    if (method_ == MergeMethod::Slerp && !base_)
      throw UsageError("slerp needs a base_model (t = 0 gives it)");
    if (has_models) {
      plan_models();
    } else {
      plan_slices();
    }
    for (const auto& model : models_) plan_.checkpoints.push_back(model->path);
    plan_.index_metadata["merge_method"] = polyak::to_string(method_);
    if (root_["parameters"] && root_["parameters"]["int8_mask"])
      notes.push_back("int8_mask: polyak's masks are bits; it changes no value");
    return plan_;
  }

  /// The layers the output holds, and the model whose other files the output copies.
  std::size_t output_layers() const { return output_layers_; }
  const Model* files_from() const { return base_ ? base_ : first_; }

 private:
  static void check_keys(const YAML::Node& node, const std::set<std::string>& known,
                         const std::set<std::string>& unsupported, const std::string& where) {
    if (!node.IsMap()) throw UsageError(where + " is not a mapping" + where_of(node));
    check_unique_keys(node, where);
    for (const auto& entry : node) {
      const std::string key = entry.first.as<std::string>();
      if (unsupported.count(key))
        throw UsageError(where + ": '" + key + "' is mergekit's, and polyak does not take it" +
                         where_of(entry.first));
      if (!known.count(key))
        throw UsageError(where + ": '" + polyak::detail::visible(key) + "' is not a key of it" +
                         where_of(entry.first));
    }
  }

  /// YAML forbids a key twice in one mapping, but yaml-cpp reads such a mapping and finds the first:
  /// refused, as it would be one value silently dropped.
  static void check_unique_keys(const YAML::Node& node, const std::string& where) {
    std::set<std::string> keys;
    for (const auto& entry : node) {
      if (!entry.first.IsScalar())
        throw UsageError(where + ": a key that is not a name" + where_of(entry.first));
      if (!keys.insert(entry.first.Scalar()).second)
        throw UsageError(where + ": '" + polyak::detail::visible(entry.first.Scalar()) + "' appears twice" +
                         where_of(entry.first));
    }
  }

  static std::string required_string(const YAML::Node& node, const std::string& key) {
    const YAML::Node value = node[key];
    if (!value || !value.IsScalar() || value.Scalar().empty())
      throw UsageError("'" + key + "' is missing or not a name" + where_of(node));
    return value.Scalar();
  }

  static std::optional<polyak::DType> dtype_named(const YAML::Node& node, const std::string& key) {
    if (!node) return std::nullopt;
    const std::string name = node.IsScalar() ? node.Scalar() : std::string();
    if (name == "float32") return polyak::DType::F32;
    if (name == "float16") return polyak::DType::F16;
    if (name == "bfloat16") return polyak::DType::BF16;
    if (name == "float64") return polyak::DType::F64;
    throw UsageError(key + " '" + polyak::detail::visible(name) +
                     "' is none of float32, float16, bfloat16, float64" + where_of(node));
  }

  /// Refuses a parameter the method does not take there (a method's in a model's block: mergekit
  /// would not read it there).
  void check_parameter_block(const YAML::Node& block, const std::string& where, bool method_level) const {
    if (!block || block.IsNull()) return;  // (none, or an empty "parameters:")
    if (!block.IsMap()) throw UsageError(where + " is not a mapping" + where_of(block));
    check_unique_keys(block, where);
    for (const auto& entry : block) {
      const std::string key = entry.first.as<std::string>();
      const bool per_model = names_.per_model.count(key) > 0, per_method = names_.per_method.count(key) > 0;
      if (per_model || (per_method && method_level)) continue;
      throw UsageError(where + ": '" + polyak::detail::visible(key) + "' is not a parameter " +
                       (per_method ? "of a model for " : "of ") + polyak::to_string(method_) +
                       where_of(entry.first));
    }
  }

  /// The model at `path`, read once: two paths of the same data files (through links, a folder and
  /// its index or its model.safetensors) are one model.
  Model& model(const std::string& path) {
    const polyak::CheckpointReader reader(path);
    const std::vector<polyak::detail::FileId> key = polyak::detail::data_file_ids(reader);
    for (auto& m : models_) {
      if (m->key == key) return *m;
    }
    auto m = std::make_unique<Model>();
    m->path = path;
    m->key = key;
    m->index = models_.size();
    for (const auto& t : reader.tensors()) {
      m->names.push_back(t.name);
      m->dtypes[t.name] = t.dtype;
      std::size_t prefix_end = 0, layer = 0, rest = 0;
      if (layer_of(t.name, prefix_end, layer, rest)) {
        m->layers[layer].push_back(t.name);
      } else {
        m->others.push_back(t.name);
      }
    }
    models_.push_back(std::move(m));
    return *models_.back();
  }

  /// A parameter for one tensor: per model (`source` given) or per method.
  std::optional<Value> parameter(const std::string& key, const Source* source,
                                 const YAML::Node& slice_parameters, const std::string& name,
                                 double t) const {
    for (const YAML::Node& block :
         {source ? source->parameters : YAML::Node(), slice_parameters, root_["parameters"]}) {
      if (block && block.IsMap() && block[key]) {
        if (auto value = evaluate(block[key], name, t, key)) return value;
      }
    }
    return std::nullopt;
  }

  double number(const std::optional<Value>& v, const std::string& key, const std::string& name) const {
    if (!std::holds_alternative<double>(*v))
      throw UsageError(key + " for '" + name + "' is true/false, not a number");
    return std::get<double>(*v);
  }
  bool truth(const std::optional<Value>& v, const std::string& key, const std::string& name) const {
    if (!std::holds_alternative<bool>(*v))
      throw UsageError(key + " for '" + name + "' is a number, not true/false");
    return std::get<bool>(*v);
  }

  /// The output tensor `out` merged from `inputs` (the tensors of one layer position, or of none) of
  /// `sources`, at layer position t.
  void plan_tensor(const std::string& out, const std::vector<std::pair<const Source*, std::string>>& inputs,
                   const YAML::Node& slice_parameters, double t) {
    polyak::PlannedTensor planned;
    planned.name = out;
    planned.options.method = method_;
    const Model& reference = *inputs.front().first->model;
    const polyak::DType own = reference.dtypes.at(inputs.front().second);
    planned.dtype = own == polyak::DType::I64 ? own : out_dtype_.value_or(own);
    std::vector<const Source*> merged;  // (not the base)
    std::vector<std::string> merged_names;
    for (const auto& [source, name] : inputs) {
      if (base_ && source->model == base_ && method_ != MergeMethod::Slerp) {
        planned.base = polyak::TensorRef{source->model->index, name};
        continue;
      }
      merged.push_back(source);
      merged_names.push_back(name);
    }
    if (method_ == MergeMethod::Slerp) {  // polyak's slerp: x_1 (t = 0) is the base
      std::vector<const Source*> ordered;
      std::vector<std::string> ordered_names;
      for (std::size_t i = 0; i < merged.size(); ++i) {
        if (merged[i]->model == base_) {
          ordered.insert(ordered.begin(), merged[i]);
          ordered_names.insert(ordered_names.begin(), merged_names[i]);
        } else {
          ordered.push_back(merged[i]);
          ordered_names.push_back(merged_names[i]);
        }
      }
      if (ordered.empty() || ordered.front()->model != base_)
        throw UsageError("slerp's base_model is not among the models merged");
      merged = ordered;
      merged_names = ordered_names;
    } else if (polyak::needs_base(method_) && !planned.base) {
      throw UsageError("the base_model '" + base_->path + "' gives no tensor for '" + out + "'");
    }
    for (std::size_t i = 0; i < merged.size(); ++i)
      planned.models.push_back({merged[i]->model->index, merged_names[i]});
    polyak::MergeOptions& o = planned.options;
    // Per model: weight (required where the method takes it, as mergekit), density, gamma, epsilon.
    std::optional<double> gamma, epsilon;
    for (std::size_t i = 0; i < merged.size(); ++i) {
      const std::string& name = merged_names[i];
      for (const auto& key : names_.per_model) {
        const auto value = parameter(key, merged[i], slice_parameters, name, t);
        if (!value) {
          if (key == "weight")
            throw UsageError("no weight for '" + merged[i]->model->path + "' (mergekit requires one)");
          continue;
        }
        const double v = number(value, key, name);
        if (key == "weight") o.weights.push_back(v);
        if (key == "density") {
          o.densities.resize(merged.size(), 1.0);
          o.densities[i] = v;
        }
        const auto same = [&](std::optional<double>& kept) {
          if (kept && !polyak::detail::exactly_equal(*kept, v))
            throw UsageError(key + " differs between models for '" + out + "': polyak takes one a tensor");
          kept = v;
        };
        if (key == "gamma") same(gamma);
        if (key == "epsilon") same(epsilon);
      }
    }
    if (gamma) o.gamma = *gamma;
    if (epsilon) o.epsilon = *epsilon;
    for (const auto& key : names_.per_method) {
      const auto value = parameter(key, nullptr, slice_parameters, out, t);
      if (!value) {
        if (key == "t") throw UsageError(std::string(polyak::to_string(method_)) + " needs the parameter t");
        continue;
      }
      if (key == "normalize") {
        const bool normalize = truth(value, key, out);
        if (method_ == MergeMethod::Average) {
          if (!normalize) throw UsageError("linear with normalize false: polyak's linear always normalizes");
        } else {
          o.normalize = normalize;
        }
      }
      if (key == "rescale") o.rescale = truth(value, key, out);
      if (key == "int8_mask") truth(value, key, out);
      if (key == "lambda") o.scale = number(value, key, out);
      if (key == "t") o.t = number(value, key, out);
      if (key == "filter_wise") o.filter_wise = truth(value, key, out);
      if (key == "select_topk") o.select_topk = number(value, key, out);
      if (key == "nuslerp_flatten") o.nuslerp_flatten = truth(value, key, out);
      if (key == "nuslerp_row_wise") o.nuslerp_row_wise = truth(value, key, out);
      if (key == "normalize_weights") o.normalize_weights = truth(value, key, out);
      if (key == "eps") o.eps = number(value, key, out);
      if (key == "tol") o.tol = number(value, key, out);
      if (key == "max_iter") {
        const double n = number(value, key, out);
        if (!(n >= 0 && n <= 1000000) || std::floor(n) != n)
          throw UsageError("max_iter for '" + out + "' is not a whole number in [0, 1000000]");
        o.max_iter = static_cast<long long>(n);
      }
    }
    try {
      o.check(planned.models.size(), planned.base.has_value());
    } catch (const std::invalid_argument& e) {
      throw UsageError("'" + out +
                       "': " + std::string(e.what()).substr(std::string("polyak::merge: ").size()));
    }
    plan_.tensors.push_back(std::move(planned));
  }

  static double position(std::size_t i, std::size_t n) {
    return n > 1 ? static_cast<double>(i) / static_cast<double>(n - 1) : 1.0;
  }

  /// The tensors of no layer: the embeddings (a name with "embed") first, at t = 0, before the
  /// layers; the rest (final norm, head) at t = 1, after them.
  void plan_others(const std::vector<Source>& sources, const YAML::Node& slice_parameters, bool embeddings) {
    const Model& reference = *sources.front().model;
    for (const auto& name : reference.others) {
      if ((name.find("embed") != std::string::npos) != embeddings) continue;
      std::vector<std::pair<const Source*, std::string>> inputs;
      for (const auto& source : sources) inputs.emplace_back(&source, name);
      plan_tensor(name, inputs, slice_parameters, embeddings ? 0.0 : 1.0);
    }
  }

  void check_same_tensors(const Model& a, const Model& b) const {
    if (a.names.size() != b.names.size() ||
        !std::is_permutation(a.names.begin(), a.names.end(), b.names.begin())) {
      for (const auto& n : a.names) {
        if (!b.dtypes.count(n))
          throw polyak::InvalidArgument("'" + b.path + "' has no tensor '" + n + "', which '" + a.path +
                                        "' has");
      }
      for (const auto& n : b.names) {
        if (!a.dtypes.count(n))
          throw polyak::InvalidArgument("'" + a.path + "' has no tensor '" + n + "', which '" + b.path +
                                        "' has");
      }
    }
  }

  void plan_models() {
    const YAML::Node list = root_["models"];
    if (!list.IsSequence() || list.size() == 0)
      throw UsageError("models is not a list of models" + where_of(list));
    std::vector<Source> sources;
    for (const auto& entry : list) {
      check_keys(entry, {"model", "parameters"}, {}, "a model");
      Source s;
      s.model = &model(required_string(entry, "model"));
      if (const YAML::Node p = entry["parameters"]) s.parameters = p;  // (assigning a missing node throws)
      check_parameter_block(s.parameters, "the parameters of '" + s.model->path + "'", false);
      for (const auto& other : sources) {
        if (other.model == s.model) throw UsageError("'" + s.model->path + "' is listed twice in models");
      }
      sources.push_back(s);
    }
    if (base_ &&
        std::none_of(sources.begin(), sources.end(), [&](const Source& s) { return s.model == base_; })) {
      Source s;  // (mergekit adds the base to the models)
      s.model = base_;
      sources.push_back(s);
    }
    first_ = sources.front().model;
    const Model& reference = base_ ? *base_ : *first_;
    for (const auto& s : sources) check_same_tensors(reference, *s.model);
    const std::size_t layers = reference.layers.empty() ? 0 : reference.layers.rbegin()->first + 1;
    output_layers_ = layers;
    // In the reference's order, each tensor at its layer's position.
    for (const auto& name : reference.names) {
      std::size_t prefix_end = 0, layer = 0, rest = 0;
      double t = 0;
      if (layer_of(name, prefix_end, layer, rest)) {
        t = position(layer, layers);
      } else {
        t = name.find("embed") != std::string::npos ? 0.0 : 1.0;
      }
      std::vector<std::pair<const Source*, std::string>> inputs;
      for (const auto& s : sources) inputs.emplace_back(&s, name);
      plan_tensor(name, inputs, YAML::Node(), t);
    }
    models_sources_ = std::move(sources);
  }

  void plan_slices() {
    const YAML::Node list = root_["slices"];
    if (!list.IsSequence() || list.size() == 0)
      throw UsageError("slices is not a list of slices" + where_of(list));
    std::vector<Slice> slices;
    for (const auto& entry : list) {
      check_keys(entry, {"sources", "parameters"}, {"base_model", "residual_weight"}, "a slice");
      Slice slice;
      if (const YAML::Node p = entry["parameters"]) slice.parameters = p;
      check_parameter_block(slice.parameters, "a slice's parameters", true);
      const YAML::Node sources = entry["sources"];
      if (!sources || !sources.IsSequence() || sources.size() == 0)
        throw UsageError("a slice has no list of sources" + where_of(entry));
      for (const auto& s : sources) {
        check_keys(s, {"model", "layer_range", "parameters"}, {}, "a slice's source");
        Source source;
        source.model = &model(required_string(s, "model"));
        if (const YAML::Node p = s["parameters"]) source.parameters = p;
        check_parameter_block(source.parameters, "the parameters of '" + source.model->path + "'", false);
        const YAML::Node range = s["layer_range"];
        if (!range || !range.IsSequence() || range.size() != 2)
          throw UsageError("a source's layer_range is not [first, end]" + where_of(s));
        std::int64_t bounds[2] = {0, 0};
        for (int i = 0; i < 2; ++i) {
          if (!range[i].IsScalar())
            throw UsageError("a layer_range bound is not a whole number >= 0" + where_of(range));
          const std::string text = range[i].Scalar();
          if (text.size() > 1 && text[0] == '0')  // (YAML 1.1 reads "010" as octal 8)
            throw UsageError("a layer_range bound '" + polyak::detail::visible(text) +
                             "': a number YAML 1.1 (mergekit's reader) reads otherwise; write it plainly" +
                             where_of(range));
          if (!polyak_tools::parse_count(text, bounds[i]))
            throw UsageError("a layer_range bound '" + polyak::detail::visible(text) +
                             "' is not a whole number >= 0" + where_of(range));
        }
        if (bounds[0] >= bounds[1])
          throw UsageError("a layer_range [first, end] needs first < end" + where_of(range));
        source.first = static_cast<std::size_t>(bounds[0]);
        source.end = static_cast<std::size_t>(bounds[1]);
        for (std::size_t layer = source.first; layer < source.end; ++layer) {
          if (!source.model->layers.count(layer))
            throw UsageError("'" + source.model->path + "' has no layer " + std::to_string(layer) +
                             where_of(range));
        }
        if (!slice.sources.empty() &&
            source.end - source.first != slice.sources.front().end - slice.sources.front().first)
          throw UsageError("a slice's sources cover different numbers of layers" + where_of(range));
        slice.sources.push_back(source);
      }
      if (method_ == MergeMethod::Passthrough && slice.sources.size() != 1)
        throw UsageError("passthrough takes one source a slice, not " + std::to_string(slice.sources.size()));
      slices.push_back(std::move(slice));
    }
    first_ = slices.front().sources.front().model;
    plan_others(slices.front().sources, slices.front().parameters, true);
    std::size_t out_layer = 0;
    for (const auto& slice : slices) {
      const std::size_t count = slice.sources.front().end - slice.sources.front().first;
      for (std::size_t i = 0; i < count; ++i, ++out_layer) {
        const Source& lead = slice.sources.front();
        const std::vector<std::string>& names = lead.model->layers.at(lead.first + i);
        for (const auto& source : slice.sources) {  // every source's layer holds the same tensors
          const auto& theirs = source.model->layers.at(source.first + i);
          for (const auto& name : names) {
            if (std::none_of(theirs.begin(), theirs.end(),
                             [&](const std::string& n) { return renumbered(n, 0) == renumbered(name, 0); }))
              throw polyak::InvalidArgument("'" + source.model->path + "' layer " +
                                            std::to_string(source.first + i) + " has no tensor like '" +
                                            name + "'");
          }
          if (theirs.size() != names.size())
            throw polyak::InvalidArgument("'" + source.model->path + "' layer " +
                                          std::to_string(source.first + i) + " holds other tensors than '" +
                                          lead.model->path + "' layer " + std::to_string(lead.first + i));
        }
        for (const auto& name : names) {  // each source's own name of it ("layers.07." stays so)
          std::vector<std::pair<const Source*, std::string>> inputs;
          for (const auto& source : slice.sources) {
            const auto& theirs = source.model->layers.at(source.first + i);
            inputs.emplace_back(&source,
                                *std::find_if(theirs.begin(), theirs.end(), [&](const std::string& n) {
                                  return renumbered(n, 0) == renumbered(name, 0);
                                }));
          }
          plan_tensor(renumbered(name, out_layer), inputs, slice.parameters, position(i, count));
        }
      }
    }
    output_layers_ = out_layer;
    plan_others(slices.back().sources, slices.back().parameters, false);
    slices_ = std::move(slices);
  }

  const YAML::Node root_;
  MergeMethod method_ = MergeMethod::Average;
  ParameterNames names_;
  std::optional<polyak::DType> out_dtype_;
  std::vector<std::unique_ptr<Model>> models_;
  Model* base_ = nullptr;
  Model* first_ = nullptr;
  std::vector<Source> models_sources_;  // (kept alive: plan_tensor's inputs point into them)
  std::vector<Slice> slices_;
  std::size_t output_layers_ = 0;
  polyak::MergePlan plan_;
};

/// A file's whole text; a file that cannot be read whole (a read error, a size that changes while it
/// is read) is refused, never taken as shorter.
std::string read_text(const std::string& path) {
  std::error_code error;
  if (!fs::is_regular_file(path, error))
    throw UsageError("cannot read '" + polyak::detail::visible(path) + "': not a file");
  const std::uintmax_t size = fs::file_size(path, error);
  std::ifstream in(path, std::ios::binary);
  if (!in || error) throw UsageError("cannot read '" + polyak::detail::visible(path) + "'");
  std::string text(static_cast<std::size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (static_cast<std::uintmax_t>(in.gcount()) != size || in.bad() ||
      in.peek() != std::ifstream::traits_type::eof())
    throw polyak::RuntimeError("polyak-mergekit: '" + polyak::detail::visible(path) +
                               "' could not be read whole");
  return text;
}

/// The non-weight files of a model folder (config.json, tokenizer files), to copy beside the output.
std::map<std::string, std::string> other_files(const std::string& model, std::size_t layers) {
  std::map<std::string, std::string> files;
  fs::path folder = model;
  if (!fs::is_directory(folder)) folder = folder.parent_path();
  if (folder.empty() || !fs::is_directory(folder) || fs::is_regular_file(model)) return files;  // a lone file
  for (const auto& entry : fs::directory_iterator(folder)) {
    const std::string name = entry.path().filename().string();
    const std::string extension = entry.path().extension().string();
    if (!entry.is_regular_file() || name.empty() || name[0] == '.' ||
        name == polyak::detail::sharded_index_name || name == "mergekit_config.yml" ||
        name.rfind("model-", 0) == 0)
      continue;
    static const std::set<std::string> weights = {".safetensors", ".bin",  ".pt", ".pth",
                                                  ".ckpt",        ".gguf", ".h5", ".msgpack"};
    if (weights.count(extension)) continue;
    std::string text = read_text(entry.path().string());
    if (name == "config.json") {  // the layer count of the output
      nlohmann::json config = nlohmann::json::parse(text, nullptr, false);
      if (config.is_object() && config.contains("num_hidden_layers") && layers > 0) {
        config["num_hidden_layers"] = layers;
        text = config.dump(2) + "\n";
      }
    }
    files[name] = std::move(text);
  }
  return files;
}

std::string bytes_text(std::uint64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f GB", static_cast<double>(bytes) / 1e9);
  return text;
}

std::string options_text(const polyak::MergeOptions& o) {
  std::ostringstream text;
  const polyak::MergeOptions d;
  text << polyak::to_string(o.method);
  if (!o.weights.empty()) {
    text << " weights";
    for (const double w : o.weights) text << " " << w;
  }
  if (!o.densities.empty()) {
    text << " densities";
    for (const double w : o.densities) text << " " << w;
  }
  if (!polyak::detail::exactly_equal(o.scale, d.scale)) text << " lambda " << o.scale;
  if (polyak::sparsification_of(o.method) == polyak::Sparsification::Outliers) text << " gamma " << o.gamma;
  if (polyak::sparsification_of(o.method) == polyak::Sparsification::RankSampling)
    text << " epsilon " << o.epsilon;
  if (o.normalize) text << " normalize " << (*o.normalize ? "true" : "false");
  if (o.rescale) text << " rescale " << (*o.rescale ? "true" : "false");
  if (o.method == MergeMethod::Slerp || o.method == MergeMethod::NearSwap) text << " t " << o.t;
  if (o.filter_wise) text << " filter_wise";
  if (o.method == MergeMethod::Sce) text << " select_topk " << o.select_topk;
  if (!o.nuslerp_flatten) text << " nuslerp_flatten false";
  if (o.nuslerp_row_wise) text << " nuslerp_row_wise";
  if (!o.normalize_weights) text << " normalize_weights false";
  if (o.method == MergeMethod::MultiSlerp) text << " eps " << o.eps;
  if (o.method == MergeMethod::Karcher) text << " max_iter " << o.max_iter << " tol " << o.tol;
  return text.str();
}

int run(int argc, char** argv) {
  bool dry_run = false;
  std::uint64_t shard_size = 5000000000ull;
  std::vector<std::string> positional;
  bool options_done = false, shard_given = false, threads_given = false;
  unsigned threads = 0;
  // The whole number after option argv[i], given once, in [least, most].
  const auto whole_once = [&](int& i, bool& given, std::int64_t least, std::int64_t most, const char* range) {
    const std::string option = argv[i];
    if (given) throw UsageError(option + " is given twice");
    if (i + 1 >= argc) throw UsageError(option + " needs a value");
    given = true;
    const std::string value = argv[++i];
    std::int64_t n = 0;
    if (!polyak_tools::parse_count(value, n) || n < least || n > most)
      throw UsageError(option + " '" + polyak::detail::visible(value) + "' is not a whole number " + range);
    return n;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (options_done || arg.empty() || arg[0] != '-' || arg == "-") {
      positional.push_back(arg);
    } else if (arg == "--") {
      options_done = true;
    } else if (arg == "--help" || arg == "-h") {
      std::fputs(usage_text, stdout);
      return 0;
    } else if (arg == "--dry-run") {
      if (dry_run) throw UsageError("--dry-run is given twice");
      dry_run = true;
    } else if (arg == "--shard-size") {
      shard_size = static_cast<std::uint64_t>(
          whole_once(i, shard_given, 1, std::numeric_limits<std::int64_t>::max(), ">= 1"));
    } else if (arg == "--num-threads") {
      threads = static_cast<unsigned>(whole_once(i, threads_given, 0, 64, "in [0, 64]"));
    } else {
      throw UsageError("unknown option '" + polyak::detail::visible(arg) +
                       "' (a file named so goes after --)");
    }
  }
  if (positional.size() != 2) throw UsageError("needs CONFIG and OUT");
  const std::string config_path = positional[0], out = positional[1];
  if (out.empty()) throw UsageError("OUT is the empty path");
  const std::string config_text = read_text(config_path);
  YAML::Node root;
  try {
    const std::vector<YAML::Node> documents = YAML::LoadAll(config_text);
    if (documents.size() != 1)
      throw UsageError("the config holds " + std::to_string(documents.size()) + " YAML documents, not one");
    root = documents.front();
  } catch (const YAML::Exception& e) {
    throw UsageError("the config is not YAML: " + std::string(e.what()));
  }
  Planner planner(root);
  std::vector<std::string> notes;
  polyak::MergePlan plan = planner.plan(notes);
  for (auto& t : plan.tensors) t.options.threads = threads;
  if (planner.files_from() != nullptr)
    plan.files = other_files(planner.files_from()->path, planner.output_layers());
  plan.files["mergekit_config.yml"] = config_text;
  for (const auto& note : notes) std::printf("polyak-mergekit: note: %s\n", note.c_str());
  if (dry_run) {
    polyak::check_merge_plan(plan, out, shard_size);  // (what the run would refuse, refused now)
    std::uint64_t total = 0;
    for (const auto& t : plan.tensors) {
      const polyak::CheckpointReader reader(plan.checkpoints[t.models.front().checkpoint]);
      const auto* in = reader.find(t.models.front().name);
      if (in == nullptr) throw polyak::InvalidArgument("'" + t.models.front().name + "' is missing");
      const std::uint64_t bytes = in->numel() * polyak::dtype_size(t.dtype);
      total += bytes;
      std::printf("%s %s %s <-", polyak::detail::visible(t.name).c_str(), polyak::dtype_name(t.dtype),
                  polyak::detail::shape_string(in->shape).c_str());
      for (const auto& ref : t.models)
        std::printf(" %s:%s", polyak::detail::visible(plan.checkpoints[ref.checkpoint]).c_str(),
                    polyak::detail::visible(ref.name).c_str());
      if (t.base)
        std::printf(" base %s:%s", polyak::detail::visible(plan.checkpoints[t.base->checkpoint]).c_str(),
                    polyak::detail::visible(t.base->name).c_str());
      std::printf(" | %s\n", options_text(t.options).c_str());
    }
    std::printf("polyak-mergekit: dry run: %zu tensors, %s, %zu layers; files copied:", plan.tensors.size(),
                bytes_text(total).c_str(), planner.output_layers());
    for (const auto& [name, content] : plan.files) std::printf(" %s", polyak::detail::visible(name).c_str());
    std::printf("; nothing written\n");
    return 0;
  }
  polyak::run_merge_plan(plan, out, shard_size);
  std::printf("polyak-mergekit: %s of %zu tensors into %s\n",
              polyak::to_string(plan.tensors.front().options.method), plan.tensors.size(),
              polyak::detail::visible(out).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "polyak-mergekit: %s; no output written\n%s", e.what(), usage_text);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "polyak-mergekit: %s; no output written\n", e.what());
    return 1;
  }
}
