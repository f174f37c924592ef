// liveavatar-dit-bench: see dit_bench.cpp (also reachable as `liveavatar-bench --dit ...`).
// SPDX-License-Identifier: LGPL-2.1-or-later
int liveavatar_dit_bench_main(int argc, char** argv);

int main(int argc, char** argv) { return liveavatar_dit_bench_main(argc, argv); }
