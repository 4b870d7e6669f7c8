"""The CUDA kernels run on the CPU (g++ + `cuda_emu.h`), for verification only."""
