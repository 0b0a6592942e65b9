"""`avllm demo` as a Hydra script (NeMo convention): python scripts/demo.py [--config-name NAME] key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("demo")

if __name__ == "__main__":
    main()
