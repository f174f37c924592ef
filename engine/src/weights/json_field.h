// gst-liveavatar: reading one field of an untrusted JSON config (config.json of a model folder) into a C++ value.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// nlohmann::json's get<T>() converts a number of any kind into an integer field with a plain cast, which is
// undefined behaviour when the value does not fit (2.9e53 into int64_t). read_json_field() refuses a fraction or an
// out-of-range value for an integer field (also inside arrays) with std::invalid_argument naming the value; the
// callers turn it into their "a field has the wrong type" error.
#pragma once

#include <nlohmann/json.hpp>

#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace liveavatar::weights {

template <typename T>
struct IsVector : std::false_type {};
template <typename U, typename A>
struct IsVector<std::vector<U, A>> : std::true_type {};

template <typename T>
void read_json_field(const nlohmann::json& v, T& field) {
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    const auto bad = [&](const char* why) {
      return std::invalid_argument(v.dump().substr(0, 80) + " is " + why + " (an integer field)");
    };
    if (!v.is_number_integer()) throw bad(v.is_number() ? "not a whole number" : "not a number");
    if (v.is_number_unsigned()) {
      const auto u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<T>::max())) throw bad("too large");
      field = static_cast<T>(u);
    } else {
      const auto s = v.get<int64_t>();
      if (s < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
          (s > 0 && static_cast<uint64_t>(s) > static_cast<uint64_t>(std::numeric_limits<T>::max())))
        throw bad("out of range");
      field = static_cast<T>(s);
    }
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) throw std::invalid_argument(v.dump().substr(0, 80) + " is not a number");
    field = v.get<T>();
  } else if constexpr (IsVector<T>::value) {
    if (!v.is_array()) throw std::invalid_argument(v.dump().substr(0, 80) + " is not an array");
    T out(v.size());
    for (size_t i = 0; i < v.size(); ++i) read_json_field(v[i], out[i]);
    field = std::move(out);
  } else {
    field = v.get<T>();  // bool, string: nlohmann refuses other kinds with a type_error
  }
}

}  // namespace liveavatar::weights
