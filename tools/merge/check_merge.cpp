// SPDX-License-Identifier: MIT
// Runs polyak-merge on checkpoints made here and checks its output against closed forms:
// the uniform mean, a weighted mean, an EMA over the files in order; that inputs that disagree are
// refused with no output file; and that every bad argument gets a message, a non-zero exit (never a
// crash) and no file written.
//   check_merge PATH_TO_polyak-merge WORK_FOLDER
#include <polyak/checkpoint/safetensors.hpp>
#include <polyak/checkpoint/sharded_checkpoint.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <filesystem>
#include <string>
#include <vector>

#include <sys/wait.h>  // WIFEXITED: std::system's status

namespace {

int failures = 0;
void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  failures += !ok;
}

/// Checkpoint k: w = k + i / 8 (F32, 2 x 3), h = 2k (F16, 4), n_averaged = 10 k.
std::string checkpoint(const std::string& folder, int k, bool other_shape = false) {
  std::vector<float> w(6);
  for (std::size_t i = 0; i < 6; ++i) w[i] = static_cast<float>(k) + static_cast<float>(i) / 8;
  std::vector<Eigen::half> h(4, Eigen::half(static_cast<float>(2 * k)));
  polyak::StateDict sd;
  sd.insert("w", w.data(), other_shape ? std::vector<std::int64_t>{3, 2} : std::vector<std::int64_t>{2, 3});
  sd.insert("h", h.data(), {4});
  sd.insert_scalar<std::int64_t>("n_averaged", 10 * k);
  const std::string path =
      folder + "/ck" + std::to_string(k) + (other_shape ? "_other" : "") + ".safetensors";
  polyak::save_safetensors(path, sd);
  return path;
}

float w0(const std::string& path) {
  const auto sd = polyak::load_safetensors(path);
  float v;
  std::memcpy(&v, sd.at("w").bytes.data(), 4);
  return v;
}

/// Every element of h (F16) in `path`, as floats.
std::vector<float> h_of(const std::string& path) {
  const auto sd = polyak::load_safetensors(path);
  std::vector<float> values;
  for (const double x : polyak::to_doubles(sd.at("h"))) values.push_back(static_cast<float>(x));
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const std::string tool = argv[1], folder = argv[2];
  std::filesystem::create_directories(folder);
  const std::string a = checkpoint(folder, 1), b = checkpoint(folder, 2), c = checkpoint(folder, 6);
  const std::string out = folder + "/out.safetensors";
  auto run = [&](const std::string& args) { return std::system((tool + " " + args).c_str()); };

  expect(run(out + " " + a + " " + b + " " + c) == 0, "uniform average runs");
  auto sd = polyak::load_safetensors(out);
  expect(w0(out) == 3.0f, "uniform: w[0] is (1 + 2 + 6) / 3 = 3");
  float w5;
  std::memcpy(&w5, sd.at("w").bytes.data() + 20, 4);
  expect(w5 == 3.625f, "uniform: w[5] is 3 + 5/8");
  expect(sd.at("h").dtype == polyak::DType::F16, "dtypes kept");
  expect(sd.scalar<std::int64_t>("n_averaged") == 60, "integer tensors come from the last file");

  expect(run("--weights 1,1,2 " + out + " " + a + " " + b + " " + c) == 0, "weighted average runs");
  expect(w0(out) == 3.75f, "weighted: (1 + 2 + 2 * 6) / 4 = 3.75");

  expect(run("--ema 0.5 " + out + " " + a + " " + b + " " + c) == 0, "EMA runs");
  expect(w0(out) == 3.75f, "EMA 0.5: ((1 + 2) / 2 + 6) / 2 = 3.75");

  std::filesystem::remove(out);
  const std::string bad = checkpoint(folder, 3, /*other_shape=*/true);
  expect(run(out + " " + a + " " + bad + " 2>/dev/null") != 0, "a checkpoint of another shape is refused");
  expect(!std::filesystem::exists(out), "and no output is written");
  // Issue 12, item 7: bad arguments. Each one: exit 2 with a usage message, nothing written (the
  // folder holds only the inputs afterwards). Before the fix some aborted (exit 134), some wrote a
  // wrong average with exit 0, and "--help a b" wrote a file named "--help".
  const std::string log = folder + "/stderr.txt";
  auto refused = [&](const std::string& args, const std::string& why) {
    const int status = std::system(("cd " + folder + " && " + tool + " " + args + " 2>" + log).c_str());
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::ifstream in(log);
    const std::string message((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::size_t files = 0;
    for (const auto& entry : std::filesystem::directory_iterator(folder)) files += entry.path() != log;
    expect(code == 2 && message.find("usage:") != std::string::npos && files == 4,
           "refused with usage, exit 2, nothing written: " + why + " (exit " + std::to_string(code) + ")");
  };
  const std::string inputs = " out.safetensors " + a + " " + b;
  refused("--ema -0.5" + inputs, "--ema -0.5");
  refused("--ema nan" + inputs, "--ema nan");
  refused("--ema abc" + inputs, "--ema abc");
  refused("--ema 0.5x" + inputs, "--ema 0.5x");
  refused("--ema", "--ema without a value");
  refused("--weights inf,1" + inputs, "--weights inf,1");
  refused("--weights abc,1" + inputs, "--weights abc");
  refused("--weights 1,,1" + inputs, "--weights 1,,1");
  refused("--weights 1, " + inputs, "--weights with an empty item");
  refused("--weights 1e999,1" + inputs, "--weights 1e999");
  refused("--weights 1x,2" + inputs, "--weights 1x,2");
  refused("--weights -1,2" + inputs, "--weights -1,2");
  refused("--weights 0,0" + inputs, "--weights 0,0");
  refused("--weights 1,2,3" + inputs, "three weights for two inputs");
  refused("--weights 1,1 --ema 0.5" + inputs, "--weights with --ema");
  refused("--ema 0.5 --ema 0.6" + inputs, "--ema twice");
  refused("--bogus" + inputs, "an unknown option");
  refused("'--x\x1b[31m'" + inputs, "an unknown option holding an escape byte");
  {
    std::ifstream in(log);
    const std::string message((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    expect(message.find('\x1b') == std::string::npos && message.find("--x\\x1b[31m") != std::string::npos,
           "an unknown option is shown with its escape byte written out, not sent to the terminal");
  }
  refused("out.safetensors", "no input");
  refused(a + " " + a + " " + b, "OUT is an input");
  // Issue 16: the merge methods' arguments.
  refused("--method bogus" + inputs, "an unknown method");
  refused("--method ties" + inputs, "ties without --base");
  refused("--method ties --base " + a + " --density 2" + inputs, "--density 2");
  refused("--method dare --base " + a + " --drop 1" + inputs, "--drop 1");
  refused("--method slerp --t 1.5" + inputs, "--t 1.5");
  refused("--method slerp" + inputs + " " + c, "slerp of three inputs");
  refused("--base " + a + inputs, "--base with an average");
  refused("--latest 0" + inputs, "--latest 0");
  refused("--latest 3" + inputs, "--latest 3 of 2 inputs");
  refused("--latest 1 --weights 1,1" + inputs, "--latest with --weights");
  refused("--method ties --base " + a + " --ema 0.5" + inputs, "--ema with a merge");
  refused("--method dare --base " + a + " --seed -1" + inputs, "--seed -1");
  refused("--method dare --method ties --base " + a + inputs, "--method twice");
  refused("--method task-arithmetic --base out.safetensors" + inputs, "the base is OUT");
  // Issue 21, item 11: an option the method does not use is refused, never silently ignored.
  refused("--t 0.3" + inputs, "--t with an average");
  refused("--density 0.5" + inputs, "--density with an average");
  refused("--scale 2" + inputs, "--scale with an average");
  refused("--method slerp --weights 1,2" + inputs, "--weights with slerp");
  refused("--method slerp --scale 2" + inputs, "--scale with slerp");
  refused("--method ties --base " + a + " --drop 0.1" + inputs, "--drop with ties");
  refused("--method ties --base " + a + " --seed 3" + inputs, "--seed with ties");
  refused("--method task-arithmetic --base " + a + " --density 0.5" + inputs,
          "--density with task-arithmetic");
  refused("--method task-arithmetic --base " + a + " --t 0.5" + inputs,
          "--t 0.5 (the default) with task-arithmetic");
  refused("--method dare --base " + a + " --density 0.5 --drop 0.5" + inputs, "dare's --density and --drop");
  refused("--method slerp --ema 0.5" + inputs, "--ema with slerp");
  // --help: the usage on stdout, exit 0, and no file named "--help" or anything else
  const int help = std::system(("cd " + folder + " && " + tool + " --help a b >/dev/null").c_str());
  std::size_t files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder)) files += entry.path() != log;
  expect(WIFEXITED(help) && WEXITSTATUS(help) == 0 && files == 4,
         "--help a b prints the usage and writes nothing");
  // Huge but finite weights are normalized without overflow: 1e308,1e308 is the uniform mean.
  expect(run("--weights 1e308,1e308 " + out + " " + a + " " + b) == 0 && w0(out) == 1.5f,
         "--weights 1e308,1e308 is the uniform mean (1 + 2) / 2");

  // LAWA and the merges, against their closed forms on w[0] (inputs 1, 2, 6; base 1).
  expect(run("--latest 2 " + out + " " + a + " " + b + " " + c) == 0 && w0(out) == 4.0f,
         "--latest 2: (2 + 6) / 2 = 4");
  expect(run("--method task-arithmetic --base " + a + " --scale 0.5 " + out + " " + b + " " + c) == 0 &&
             w0(out) == 4.0f,
         "task arithmetic: 1 + 0.5 ((2 - 1) + (6 - 1)) = 4");
  expect(run("--method task_arithmetic --base " + a + " --scale 0.5 " + out + " " + b + " " + c) == 0 &&
             w0(out) == 4.0f,
         "--method task_arithmetic, mergekit's spelling and the one the messages use, is the same method");
  expect(run("--method ties --base " + a + " " + out + " " + b + " " + c) == 0 && w0(out) == 4.0f,
         "ties, density 1: 1 + mean(1, 5) = 4 (both agree in sign)");
  expect(run("--method dare --base " + a + " " + out + " " + b + " " + c) == 0 && w0(out) == 7.0f,
         "dare, drop 0: 1 + (1 + 5) = 7");
  expect(run("--method slerp --t 0 " + out + " " + b + " " + c) == 0 && w0(out) == 2.0f,
         "slerp, t 0: the first");
  // Issue 21, item 12: per-model task negation; mergekit's --density for DARE (the fraction kept).
  expect(run("--method task-arithmetic --base " + a + " --weights -1,1 " + out + " " + b + " " + c) == 0 &&
             w0(out) == 5.0f,
         "task arithmetic, weights -1, 1: 1 - (2 - 1) + (6 - 1) = 5");
  expect(run("--method dare --base " + a + " --density 1 --seed 4 " + out + " " + b + " " + c) == 0 &&
             w0(out) == 7.0f,
         "dare, --density 1 keeps everything: 1 + (1 + 5) = 7");
  expect(run("--method dare --base " + a + " --density 0.5 --seed 4 " + out + " " + b + " " + c) == 0,
         "dare, --density 0.5 runs");
  // Issue 24, item 1: mergekit's methods, on w[0] (inputs 1, 2, 6; base 1: task values 1 and 5).
  const std::string two = " " + out + " " + b + " " + c;
  expect(run("--method ties --base " + a + " --normalize false" + two) == 0 && w0(out) == 7.0f,
         "ties --normalize false: 1 + (1 + 5) = 7");
  expect(run("--method dare_ties --base " + a + two) == 0 && w0(out) == 7.0f,
         "dare_ties, density 1: 1 + (1 + 5) = 7 (no normalizing)");
  expect(run("--method breadcrumbs_ties --base " + a + " --normalize true" + two) == 0 && w0(out) == 4.0f,
         "breadcrumbs_ties --normalize true: 1 + (1 + 5) / 2 = 4");
  expect(run("--method della --base " + a + two) == 0 && w0(out) == 4.0f, "della, density 1: as ties, 4");
  expect(run("--method model_stock --base " + a + two) == 0 && w0(out) == 4.0f,
         "model_stock of parallel task vectors (every scalar 1 and 5 over the base): the mean, 4");
  expect(run("--method nearswap --t 2 --base " + a + " " + out + " " + b) == 0 && w0(out) == 2.0f,
         "nearswap, t 2, |x - b| = 1: the model, 2");
  expect(run("--method sce --base " + a + two) == 0 && w0(out) > 1.0f && w0(out) < 6.0f,
         "sce runs (its closed forms: test_merge_methods.cpp)");
  expect(run("--method linear" + two) == 0 && w0(out) == 4.0f, "mergekit's linear is the average, 4");
  expect(run("--method multislerp --weights 1,3 --base " + a + " --eps 1e-9" + two) == 0 && w0(out) == 5.0f,
         "multislerp of parallel task vectors 1 and 5, weights 1/4, 3/4: 1 + (1 + 15) / 4 = 5");
  expect(
      run("--method karcher --max-iter 3 --tol 0.001" + two) == 0 && h_of(out) == std::vector<float>(4, 8.0f),
      "karcher of parallel h, 4 and 12 everywhere: their direction at the mean norm, 8");
  // From the hostile pass: tol 0 stops at a tangent of length 0 (it divided 0 by 0); weights whose
  // sum overflows give nuslerp t = 1/2 (it gave t = 0, the first model).
  expect(run("--method karcher --tol 0" + two) == 0 && h_of(out) == std::vector<float>(4, 8.0f),
         "karcher --tol 0 runs: 8");
  expect(run("--method nuslerp --weights 1e308,1e308" + two) == 0 && h_of(out) == std::vector<float>(4, 8.0f),
         "nuslerp --weights 1e308,1e308: t = 1/2, parallel h: 8");
  std::filesystem::remove(out);  // (refused() counts the folder's files: the inputs alone)
  refused("--method nearswap --base " + a + inputs.substr(0, inputs.rfind(' ')), "nearswap without --t");
  refused("--method ties --base " + a + " --gamma 0.1" + inputs, "--gamma with ties");
  refused("--method breadcrumbs --base " + a + " --epsilon 0.1" + inputs, "--epsilon with breadcrumbs");
  refused("--method ties --base " + a + " --normalize yes" + inputs, "--normalize yes");
  refused("--method dare --base " + a + " --rescale true" + inputs, "--rescale with dare");
  refused("--method slerp --normalize true" + inputs, "--normalize with slerp");
  refused("--method karcher --weights 1,2,3" + inputs, "--weights with karcher (equal weights)");
  refused("--method karcher --base " + a + inputs, "--base with karcher");
  refused("--method karcher --max-iter 2.5" + inputs, "--max-iter 2.5");
  refused("--method karcher --max-iter 1e1" + inputs, "--max-iter 1e1 (a whole number written as one)");
  refused("--num-threads 4.0" + inputs, "--num-threads 4.0");
  refused("--num-threads 1e1" + inputs, "--num-threads 1e1");
  refused("--num-threads 65" + inputs, "--num-threads 65");
  refused("--num-threads -0" + inputs, "--num-threads '-0' is not a whole number in [0, 64]");
  refused("--method karcher --tol -1" + inputs, "--tol -1");
  refused("--method multislerp --weights 1,-1,0" + inputs, "multislerp weights summing to 0");
  refused("--method multislerp --eps 0" + inputs, "--eps 0");
  refused("--method nuslerp --eps 1e-9" + inputs, "--eps with nuslerp");
  refused("--method multislerp --max-iter 3" + inputs, "--max-iter with multislerp");
  refused("--method ties --base " + a + " --densities 0.5" + inputs, "one density for two inputs");
  refused("--method ties --base " + a + " --densities 0.5,1.5" + inputs, "--densities 0.5,1.5");
  refused("--method ties --base " + a + " --filter-wise" + inputs, "--filter-wise with ties");
  refused("--method ties --base " + a + " --density 1 --densities 0.5,0.5" + inputs,
          "--density 1 (the default) with --densities");
  refused("--method model_stock --base " + a + " --select-topk 0.5" + inputs,
          "--select-topk with model_stock");
  refused("--method della --base " + a + " --density 0.1" + inputs,
          "della's density 0.1 within epsilon of 0");
  refused("--method model_stock --base " + a + " --t 0.5" + inputs, "--t with model_stock");
  refused("--method sce --base " + a + " --weights 1,2" + inputs, "--weights with sce");

  // A sharded input gives a sharded output: the index and its shards.
  const std::string sharded = folder + "/sharded";
  std::filesystem::create_directories(sharded);
  std::filesystem::copy_file(b, sharded + "/model-00001-of-00001.safetensors");
  std::ofstream(sharded + "/model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors", )"
      << R"("h": "model-00001-of-00001.safetensors", "n_averaged": "model-00001-of-00001.safetensors"}})";
  const std::string sharded_out = folder + "/sharded_out";
  expect(run(sharded_out + " " + sharded + " " + c) == 0 &&
             std::filesystem::exists(sharded_out + "/model.safetensors.index.json") &&
             w0(sharded_out + "/model-00001-of-00001.safetensors") == 4.0f,
         "a sharded input: a sharded output, (2 + 6) / 2 = 4");
  // Issue 21, item 2: OUT inside a sharded input (its folder, its index, a shard): refused, the input
  // as it was.
  const std::string shard = sharded + "/model-00001-of-00001.safetensors";
  const std::string shard_bytes = [&] {
    std::ifstream in(shard, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  for (const std::string& inside : {sharded, sharded + "/model.safetensors.index.json", shard}) {
    const int status = run(inside + " " + sharded + " " + c + " 2>/dev/null");
    std::ifstream in(shard, std::ios::binary);
    const std::string after((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    expect(status != 0 && after == shard_bytes && polyak::CheckpointReader(sharded).tensors().size() == 3,
           "OUT " + inside.substr(folder.size()) + " (inside a sharded input) is refused, the input kept");
  }

  // Issue 24, item 4: LAWA's last k and an EMA over files go in training order, not the command
  // line's: ep1 ... ep12 listed as a glob lists them (ep1 ep10 ep11 ep12 ep2 ...).
  const std::string lawa = folder + "/lawa";
  std::filesystem::create_directories(lawa);
  const auto snapshot = [&](const std::string& name, float w, const std::string& step) {
    polyak::StateDict sd;
    sd.insert("w", &w, {1});
    if (!step.empty()) sd.metadata["step"] = step;
    polyak::save_safetensors(lawa + "/" + name, sd);
    return lawa + "/" + name;
  };
  std::vector<std::string> epochs;
  for (int e = 1; e <= 12; ++e)
    epochs.push_back(snapshot("ep" + std::to_string(e) + ".safetensors", float(e), ""));
  std::vector<std::string> glob = epochs;
  std::sort(glob.begin(), glob.end());
  std::string listed;
  for (const auto& path : glob) listed += " " + path;
  const std::string lawa_out = folder + "/lawa_out.safetensors";
  expect(run("--latest 5 " + lawa_out + listed + " >" + log) == 0 && w0(lawa_out) == 10.0f,
         "--latest 5 of ep1..ep12 listed as a glob: the mean of epochs 8..12, 10 (not ep5..ep9's 7)");
  const std::string printed = [&] {
    std::ifstream in(log);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  expect(printed.find("ep8.safetensors\n  " + lawa + "/ep9.safetensors\n  " + lawa + "/ep10") !=
                 std::string::npos &&
             printed.find("ep7.safetensors") == std::string::npos,
         "--latest prints the inputs it takes, in training order");
  expect(run("--ema 0.5 " + lawa_out + " " + epochs[9] + " " + epochs[1] + " " + epochs[0] + " >/dev/null") ==
                 0 &&
             w0(lawa_out) == 5.75f,
         "--ema 0.5 over ep10 ep2 ep1 folds ep1, ep2, ep10: ((1 + 2) / 2 + 10) / 2 = 5.75 (not 3.5)");
  // Recorded steps decide over names; an order that cannot be known is refused, nothing written.
  const std::string late = snapshot("a.safetensors", 30, "3000"),
                    early = snapshot("b.safetensors", 20, "200"),
                    earliest = snapshot("c.safetensors", 10, "10");
  expect(run("--latest 2 " + lawa_out + " " + earliest + " " + early + " " + late + " >/dev/null") == 0 &&
             w0(lawa_out) == 25.0f,
         "--latest 2 by recorded steps 10, 200, 3000 over names c, b, a: (20 + 30) / 2 = 25");
  std::filesystem::remove(lawa_out);
  const auto unknown = [&](const std::string& args, const std::string& why) {
    const int status = run(args + " 2>" + log + " >/dev/null");
    std::ifstream in(log);
    const std::string message((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    expect(WIFEXITED(status) && WEXITSTATUS(status) == 1 && message.find(why) != std::string::npos &&
               !std::filesystem::exists(lawa_out),
           "refused, nothing written: " + args.substr(0, args.find(' ', 12)) + " with " + why);
  };
  unknown("--latest 2 " + lawa_out + " " + late + " " + epochs[0], "their order is unknown");
  unknown("--ema 0.5 " + lawa_out + " " + late + " " + snapshot("d.safetensors", 1, "3000"),
          "the same step 3000");
  unknown("--latest 1 " + lawa_out + " " + epochs[6] + " " + snapshot("ep07.safetensors", 7, ""),
          "the same position");
  unknown("--latest 1 " + lawa_out + " " + epochs[0] + " " + epochs[0], "are one checkpoint");
  unknown("--latest 1 " + lawa_out + " " + snapshot("e.safetensors", 1, "12abc") + " " + late,
          "not a whole number");

  std::filesystem::remove_all(folder);
  return failures == 0 ? 0 : 1;
}
