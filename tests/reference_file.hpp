// SPDX-License-Identifier: MIT
// Reads the golden files that the scripts in tests/reference/ write: one record a line, a keyword and
// its words; numbers are exact hexadecimal floats; lines starting with '#' are comments.
#pragma once

#include <cstdlib>  // std::strtod reads hexadecimal floats exactly
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace polyak_test {

struct Record {
  std::string kind;
  std::vector<std::string> words;

  /// words[from..] as numbers.
  std::vector<double> numbers(std::size_t from = 0) const {
    std::vector<double> out;
    for (std::size_t i = from; i < words.size(); ++i) out.push_back(std::strtod(words[i].c_str(), nullptr));
    return out;
  }
  double number(std::size_t i) const { return std::strtod(words.at(i).c_str(), nullptr); }
  long long integer(std::size_t i) const { return std::stoll(words.at(i)); }
};

inline std::vector<Record> read_records(const std::string& name) {
  const std::string path = std::string(POLYAK_REFERENCE_DIR) + "/" + name;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open the golden file " + path);
  std::vector<Record> records;
  std::string text;
  while (std::getline(in, text)) {
    if (text.empty() || text[0] == '#') continue;
    std::istringstream line(text);
    Record record;
    line >> record.kind;
    for (std::string word; line >> word;) record.words.push_back(word);
    records.push_back(std::move(record));
  }
  return records;
}

}  // namespace polyak_test
