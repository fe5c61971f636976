#!/usr/bin/env bash
# Prints the CMake flags that build llama.cpp for the CPU this runs on, from /proc/cpuinfo.
#
# llama.cpp's GGML_NATIVE build enables AMX tiles where the CPU advertises them, but these VMs
# do not grant the AMX permission and the process dies with SIGILL on the first matrix
# multiply; and a list of flags fixed in advance dies the same way on a CPU that lacks one
# (an AMD EPYC has AVX-512 VNNI but not AVX-VNNI). So each x86 feature is switched on only
# where the CPU lists it, and AMX is always off.
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
out="-DGGML_NATIVE=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512_vnni:AVX512_VNNI \
  avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
  cpu=${pair%%:*}
  ggml=${pair#*:}
  if has "$cpu"; then out+=" -DGGML_$ggml=ON"; else out+=" -DGGML_$ggml=OFF"; fi
done
out+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
echo "$out"
