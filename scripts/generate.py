"""`avllm generate` as a Hydra script (NeMo convention): python scripts/generate.py key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("generate")

if __name__ == "__main__":
    main()
