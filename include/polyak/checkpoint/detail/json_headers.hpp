// SPDX-License-Identifier: MIT
// The JSON polyak reads from disk, parsed in one pass and in linear time, straight into what it
// describes (no JSON tree in between): a safetensors header and a Hugging Face sharded checkpoint's
// index (model.safetensors.index.json). As strict as Python's safetensors: the text starts with '{',
// holds no NUL byte and names no key twice in one object. And the one string quoting its writers use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>  // std::memchr, std::strchr
#include <map>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "polyak/core/error.hpp"

namespace polyak {
namespace detail {

/// Largest header load_safetensors accepts (as Python's safetensors: 100 MB); an index too.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

/// How a message names what it is about: "polyak: 'model.safetensors': " for a file, "polyak: " for
/// bytes in memory (source "").
inline std::string failure_prefix(const std::string& source) {
  return source.empty() ? "polyak: " : "polyak: '" + source + "': ";
}

/// The keys seen so far in one JSON object: a short list searched in place, a hash set past 16 keys
/// (a header's top object holds one key a tensor: 100k of them).
class KeySet {
 public:
  /// False when `key` was there already.
  bool insert(const std::string& key) {
    if (large_.empty()) {
      for (const auto& seen : small_) {
        if (seen == key) return false;
      }
      small_.push_back(key);
      if (small_.size() > 16) large_.insert(small_.begin(), small_.end());
      return true;
    }
    return large_.insert(key).second;
  }

 private:
  std::vector<std::string> small_;
  std::unordered_set<std::string> large_;
};

/// nlohmann's SAX events as calls of `Derived`: value(kind, text, number) for each value (a
/// container's as it opens), at `depth` (the containers open around it: 0 for the document),
/// named(name) for each key (after the check that it is new in its object), end(kind) as a container closes
/// (depth already back to the container's own). A key named twice in one object stops the parse, as any call
/// returning false does; `error` says why.
template <class Derived>
class JsonEvents {
 public:
  enum class Kind { String, Unsigned, Other, Object, Array };

  std::string error;  ///< why the parse stopped ("" where it did not)

  /// The deepest nesting read: a header or an index needs 3 levels; a million (a 2 MB file) would
  /// hold a million key sets in memory.
  static constexpr int max_depth = 64;

  bool null() { return self().value(Kind::Other, nullptr, 0); }
  bool boolean(bool) { return self().value(Kind::Other, nullptr, 0); }
  bool number_integer(nlohmann::json::number_integer_t) { return self().value(Kind::Other, nullptr, 0); }
  bool number_unsigned(nlohmann::json::number_unsigned_t number) {
    return self().value(Kind::Unsigned, nullptr, number);
  }
  bool number_float(nlohmann::json::number_float_t, const std::string& text) {
    return self().value(Kind::Other, &text, 0);
  }
  bool string(std::string& text) { return self().value(Kind::String, &text, 0); }
  bool binary(nlohmann::json::binary_t&) { return self().value(Kind::Other, nullptr, 0); }
  bool start_object(std::size_t) {
    if (depth_ >= max_depth) return fail("nests deeper than " + std::to_string(max_depth) + " levels");
    if (!self().value(Kind::Object, nullptr, 0)) return false;
    keys_.emplace_back();
    ++depth_;
    return true;
  }
  bool start_array(std::size_t) {
    if (depth_ >= max_depth) return fail("nests deeper than " + std::to_string(max_depth) + " levels");
    if (!self().value(Kind::Array, nullptr, 0)) return false;
    ++depth_;
    return true;
  }
  bool key(std::string& name) {
    if (!keys_.back().insert(name)) return fail("the key '" + name + "' appears twice in one object");
    return self().named(name);
  }
  bool end_object() {
    keys_.pop_back();
    --depth_;
    return self().end(Kind::Object);
  }
  bool end_array() {
    --depth_;
    return self().end(Kind::Array);
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::json::exception& e) {
    return fail(std::string("not JSON: ") + e.what());
  }

 protected:
  int depth() const noexcept { return depth_; }
  bool fail(std::string why) {
    if (error.empty()) error = std::move(why);
    return false;
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  std::vector<KeySet> keys_;  // one a open object
  int depth_ = 0;
};

/// Runs `events` over `text`, first checking what nlohmann's parser would let through: the text must
/// start with '{' (safetensors refuses anything else first: a byte-order mark, a space; with
/// `leading_space`, JSON's whitespace may come first, as Python's json reads an index file) and hold
/// no NUL byte (nlohmann's parser takes one for the end of the text and would ignore what follows).
/// Only JSON's whitespace may follow the object. Any problem is a FormatError that begins with
/// `prefix` + `what` ("polyak: 'model.safetensors': " "safetensors header").
template <class Events>
void parse_json(const char* text, std::uint64_t length, const std::string& prefix, const char* what,
                Events& events, bool leading_space = false) {
  const std::string where = prefix + what;
  std::uint64_t first = 0;
  while (leading_space && first < length && text[first] != 0 &&
         std::strchr(" \t\n\r", text[first]) != nullptr)
    ++first;
  if (first == length || text[first] != '{') throw FormatError(where + " does not start with '{'");
  const void* nul = std::memchr(text, 0, static_cast<std::size_t>(length));
  if (nul != nullptr) {
    throw FormatError(where + " holds a NUL byte at offset " +
                      std::to_string(static_cast<const char*>(nul) - text));
  }
  try {
    if (nlohmann::json::sax_parse(text, text + length, &events)) return;
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(where + " is not JSON: " + e.what());
  }
  throw FormatError(where + ": " + (events.error.empty() ? std::string("not JSON") : events.error));
}

/// `text` as a JSON string, quoted and escaped (as nlohmann::json dumps it: UTF-8 kept, control
/// characters escaped). For writers that build their JSON text in one pass: building it through a
/// nlohmann::ordered_json object looks every key up in a list, quadratic in the key count.
inline std::string json_quoted(const std::string& text) { return nlohmann::json(text).dump(); }

/// One tensor of a safetensors header as written, not yet checked (parse_header checks it).
struct HeaderEntry {
  std::string name, dtype;
  std::vector<std::uint64_t> shape, offsets;
};

/// A safetensors header: {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, ...,
/// "__metadata__": {"key": "value"}}, each tensor's object with exactly those three keys.
class SafetensorsHeaderEvents : public JsonEvents<SafetensorsHeaderEvents> {
 public:
  std::vector<HeaderEntry> entries;
  std::map<std::string, std::string> metadata;

  bool value(Kind kind, const std::string* text, std::uint64_t number) {
    switch (depth()) {
      case 0:  // the header itself (an object: parse_json checked its first byte)
        return true;
      case 1:  // a tensor's object, or __metadata__
        in_metadata_ = name_ == "__metadata__";
        if (kind != Kind::Object)
          return fail(in_metadata_ ? "__metadata__ is not an object" : tensor() + "not an object");
        if (!in_metadata_) entries.push_back({name_, {}, {}, {}});
        fields_ = 0;
        return true;
      case 2:
        if (in_metadata_) {
          if (kind != Kind::String) return fail("metadata '" + field_name_ + "' is not a string");
          metadata[field_name_] = *text;
          return true;
        }
        if (field_ == dtype_field) {
          if (kind != Kind::String) return fail(tensor() + "dtype is not a string");
          entries.back().dtype = *text;
        } else if (kind != Kind::Array) {
          return fail(tensor() + (field_ == shape_field ? "shape is not an array" : offsets_problem));
        }
        return true;
      case 3:  // an extent of the shape, or an offset
        if (kind != Kind::Unsigned) {
          return fail(tensor() + (field_ == shape_field
                                      ? "shape holds something other than a non-negative integer"
                                      : offsets_problem));
        }
        (field_ == shape_field ? entries.back().shape : entries.back().offsets).push_back(number);
        return true;
      default:
        return fail(tensor() + "nests too deep");
    }
  }

  bool named(const std::string& name) {
    if (depth() == 1) {
      if (name.empty()) return fail("header names a tensor with the empty string");
      name_ = name;
      return true;
    }
    field_name_ = name;
    if (in_metadata_) return true;
    field_ = name == "dtype"          ? dtype_field
             : name == "shape"        ? shape_field
             : name == "data_offsets" ? offsets_field
                                      : 0;
    if (field_ == 0) return fail(tensor() + "needs exactly dtype, shape and data_offsets");
    fields_ |= field_;
    return true;
  }

  bool end(Kind kind) {
    if (kind == Kind::Object && depth() == 1 && !in_metadata_ && fields_ != 7)
      return fail(tensor() + "needs exactly dtype, shape and data_offsets");
    if (kind == Kind::Array && depth() == 2 && field_ == offsets_field && entries.back().offsets.size() != 2)
      return fail(tensor() + offsets_problem);
    return true;
  }

 private:
  static constexpr unsigned dtype_field = 1, shape_field = 2, offsets_field = 4;
  static constexpr const char* offsets_problem = "data_offsets is not two non-negative integers";
  std::string tensor() const { return "tensor '" + name_ + "': "; }

  std::string name_, field_name_;  // the tensor (or __metadata__), and the key inside it
  bool in_metadata_ = false;
  unsigned field_ = 0, fields_ = 0;  // the key being read, and those seen, as bits
};

/// A sharded checkpoint's index: {"metadata": {...}, "weight_map": {"tensor": "shard file", ...}};
/// other keys are skipped. Metadata values are kept as text: strings as they are, numbers as written,
/// true, false and null as those words; objects and arrays are skipped, but for a training step's
/// keys ("step", "global_step"), which are kept as "(an object)" / "(an array)": no step reads them
/// as a number, so a checkpoint's order is refused rather than taken from its name.
class ShardIndexEvents : public JsonEvents<ShardIndexEvents> {
 public:
  std::vector<std::pair<std::string, std::string>> weight_map;  ///< in the order written
  std::map<std::string, std::string> metadata;
  bool has_weight_map = false;

  // (JsonEvents passes these without their text; the index keeps them as written)
  bool null() { return scalar("null"); }
  bool boolean(bool value) { return scalar(value ? "true" : "false"); }
  bool number_integer(nlohmann::json::number_integer_t number) { return scalar(std::to_string(number)); }

  bool value(Kind kind, const std::string* text, std::uint64_t number) {
    if (depth() == 0) return true;
    if (depth() == 1) {
      part_ = top_ == "weight_map" ? Part::WeightMap : top_ == "metadata" ? Part::Metadata : Part::Other;
      if (part_ == Part::WeightMap && kind != Kind::Object) return fail("\"weight_map\" is not an object");
      if (part_ == Part::Metadata && kind != Kind::Object) return fail("\"metadata\" is not an object");
      has_weight_map = has_weight_map || part_ == Part::WeightMap;
      return true;
    }
    if (depth() == 2 && part_ == Part::WeightMap) {
      if (kind != Kind::String) return fail("the shard of '" + key_ + "' is not a string");
      weight_map.emplace_back(key_, *text);
    } else if (depth() == 2 && part_ == Part::Metadata) {
      if (kind == Kind::String || (kind == Kind::Other && text != nullptr)) {
        metadata[key_] = *text;
      } else if (kind == Kind::Unsigned) {
        metadata[key_] = std::to_string(number);
      } else if ((kind == Kind::Object || kind == Kind::Array) && (key_ == "step" || key_ == "global_step")) {
        metadata[key_] = kind == Kind::Object ? "(an object)" : "(an array)";
      }
    }
    return true;  // (anything deeper, or elsewhere: skipped)
  }

  bool named(const std::string& name) {
    (depth() == 1 ? top_ : key_) = name;
    return true;
  }

  bool end(Kind) { return true; }

 private:
  enum class Part { WeightMap, Metadata, Other };
  bool scalar(std::string text) { return value(Kind::Other, &text, 0); }
  std::string top_, key_;
  Part part_ = Part::Other;
};

}  // namespace detail
}  // namespace polyak
