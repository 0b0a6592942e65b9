"""`avllm export-hf` as a Hydra script (NeMo convention): python scripts/export_hf.py key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("export-hf")

if __name__ == "__main__":
    main()
