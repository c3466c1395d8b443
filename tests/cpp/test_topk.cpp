#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "opd/topk.h"

namespace {

std::vector<int32_t> topk_by_sort(const std::vector<float>& row, int k) {
  std::vector<int32_t> order(row.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  order.resize(k);
  return order;
}

std::vector<int32_t> topk_streaming(const std::vector<float>& row, int k) {
  std::vector<float> values(k);
  std::vector<int32_t> ids(k);
  opd::StreamingTopK topk(values.data(), ids.data(), k);
  for (size_t i = 0; i < row.size(); ++i) topk.push(row[i], static_cast<int32_t>(i));
  return ids;
}

TEST(RanksBefore, LargerFirstThenLowerIndex) {
  EXPECT_TRUE(opd::ranks_before(2.f, 9, 1.f, 0));
  EXPECT_TRUE(opd::ranks_before(1.f, 3, 1.f, 4));
  EXPECT_FALSE(opd::ranks_before(1.f, 4, 1.f, 3));
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(opd::ranks_before(-inf, 0, -inf, 1));
  EXPECT_TRUE(opd::ranks_before(-0.f, 0, 0.f, 1));  // signed zeros tie
}

TEST(StreamingTopK, MatchesStableSortOnRandomAndTiedRows) {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> small(-2, 2);
  for (int trial = 0; trial < 50; ++trial) {
    const int vocab = 1 + trial * 37;
    const int k = 1 + trial % std::min(vocab, 20);
    std::vector<float> row(vocab);
    for (auto& x : row) x = trial % 2 ? normal(gen) : static_cast<float>(small(gen));
    EXPECT_EQ(topk_streaming(row, k), topk_by_sort(row, k)) << "vocab=" << vocab << " k=" << k;
  }
}

TEST(StreamingTopK, AscendingRowIsTheWorstCase) {
  std::vector<float> row(1000);
  std::iota(row.begin(), row.end(), 0.f);
  EXPECT_EQ(topk_streaming(row, 10), topk_by_sort(row, 10));
}

TEST(StreamingTopK, InfinitiesRankByIndexAndNaNIsSkipped) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> row = {-inf, 1.f, -inf, std::nanf(""), inf, -inf};
  EXPECT_EQ(topk_streaming(row, 4), (std::vector<int32_t>{4, 1, 0, 2}));
}

TEST(CountCommon, CountsSharedIds) {
  const int32_t a[] = {5, 1, 9, 3};
  const int32_t b[] = {3, 4, 5, 8};
  EXPECT_EQ(opd::count_common(a, b, 4), 2);
  EXPECT_EQ(opd::count_common(a, a, 4), 4);
}

}  // namespace
