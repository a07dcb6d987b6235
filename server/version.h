#ifndef BLOCKSEL_SERVER_VERSION_H_
#define BLOCKSEL_SERVER_VERSION_H_

namespace blocksel {

inline constexpr char kBlockselVersion[] = "0.1.0";

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_VERSION_H_
