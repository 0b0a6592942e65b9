"""`avllm chat` as a Hydra script (NeMo convention): python scripts/chat.py key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("chat")

if __name__ == "__main__":
    main()
