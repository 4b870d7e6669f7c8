"""CUDA sources for the paged KV cache (`*.cu`, `*.cuh`) and their compile helpers.

`build.py` compiles them with nvcc (CI check), NVRTC via CuPy (run time, see
`gpu.attention.cuda_backend`) or g++ with the CPU emulator in `cpu_emu/`.
"""
