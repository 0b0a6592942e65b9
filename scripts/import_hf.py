"""`avllm import-hf` as a Hydra script (NeMo convention): python scripts/import_hf.py key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("import-hf")

if __name__ == "__main__":
    main()
