// A communicator's average_chunk_bytes must hold at least one scalar (else averaging never advances).
#include <polyak/core/model_averaging.hpp>
struct TinyChunks {
  static constexpr std::size_t average_chunk_bytes = 2;
  polyak::ThreadCommunicator inner;
  int rank() const { return inner.rank(); }
  int size() const { return inner.size(); }
  template <class T>
  void allreduce_sum(T* data, std::size_t n) {
    inner.allreduce_sum(data, n);
  }
  TinyChunks split(int color, int key) const { return {inner.split(color, key)}; }
};
int main() {
  Eigen::VectorXf w(3);
  polyak::ParameterList<float> list;
  list.add("w", w);
  TinyChunks comm{polyak::ThreadCommunicator::create(1)[0]};
  polyak::average_parameters(list, comm);
}
