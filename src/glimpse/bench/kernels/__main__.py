from glimpse.bench.kernels.mamba_decode import main

main()
