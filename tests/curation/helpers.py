"""Real components for the curation tests: tiny random BLIP and CLAP folders (built from configs,
saved, loaded by path like downloaded models), and a real OpenAI-compatible HTTP server on
127.0.0.1 that answers chat completions deterministically from the prompt content.

The server reads the prompts as an LLM would and answers from their CONTEXT, so replies depend on
the captions; it injects the failures the client must survive: a 500 and a 429 (with Retry-After)
on the first requests, one reply slower than the client's timeout, one truncated JSON reply,
off-topic answers for audio reasoning items (the relevance filter must catch them), and low
fluency scores for visual conversations (the judge filter must catch them)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

BLIP_WORDS = "a the man woman dog cat red blue green car street room table walking sitting with on in of and".split()


def tiny_blip(folder: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + BLIP_WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=5,
                         sep_token_id=3, eos_token_id=3, encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)
    return folder


def tiny_clap(folder: Path) -> Path:
    """HF ClapModel with the tiny HTSAT of conf/model/audio/tiny.yaml and a tiny text tower; a
    byte-level RoBERTa tokenizer (the real CLAP tokenizer's kind) with an alphabet-only vocabulary."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import ClapConfig, ClapModel, RobertaTokenizer

    from nemo_avllm import config
    from nemo_avllm.hf.encoders_bridge import clap_audio_config
    from nemo_avllm.model.encoders.audio import AudioEncoderConfig

    a = config.to_dict(config.load_model("tiny").audio)
    ac = AudioEncoderConfig(model_name=a["model_name"], embed_dim=a["embed_dim"], depths=tuple(a["depths"]),
                            num_heads=tuple(a["num_heads"]))
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + sorted(ByteLevel.alphabet())
    tok = RobertaTokenizer(vocab={w: i for i, w in enumerate(vocab)}, merges=[])
    cfg = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=96, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, projection_dim=16),
        audio_config=clap_audio_config(ac).to_dict(), projection_dim=16)
    torch.manual_seed(0)
    ClapModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_whisper(folder: Path) -> Path:
    """A random `WhisperForConditionalGeneration` (the architecture of audio-captioning Whispers)
    with a 2-second, 16-mel feature extractor at 16 kHz and a byte-level tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor,
                              WhisperTokenizer)

    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    vocab = specials + sorted(ByteLevel.alphabet())
    tok = WhisperTokenizer(vocab={w: i for i, w in enumerate(vocab)}, merges=[], unk_token=specials[0],
                           bos_token=specials[0], eos_token=specials[0], pad_token=specials[0])
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, chunk_length=2)
    cfg = WhisperConfig(vocab_size=len(vocab), num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=fe.nb_max_frames // 2, max_target_positions=32, pad_token_id=0,
                        bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config.forced_decoder_ids = None
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# The chat-completions server
# --------------------------------------------------------------------------------------------

OFF_TOPIC = "Quarterly earnings beat analyst expectations as bond yields fell sharply."


def _caption_texts(text: str) -> list[str]:
    """Texts of the "[a-b s] text" lines, each once, in order."""
    seen = []
    for m in re.finditer(r"^\[[\d.]+-[\d.]+ s\] (.*)$", text, re.M):
        t = m.group(1).strip()
        if t and t not in seen:
            seen.append(t)
    return seen


def _section(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    j = text.index(end, i)
    return text[i:j].strip()


def answer(messages: list[dict]) -> tuple[str, str]:
    """(kind, reply text) for a chat request, from the first user message's content."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    if "Below are captions of video frames" in user:
        words = " then ".join(_caption_texts(user)) or "nothing"
        return "fuse_video", f"The video shows {words}."
    if "Below are sound-event tags" in user:
        tags = ", ".join(t.split(" (")[0] for line in _caption_texts(user) for t in line.split("), ")) or "silence"
        return "fuse_audio", f"The audio contains sounds of {tags}."
    if "Combine them into one consistent audio-visual caption" in user:
        v = _section(user, "Visual caption of a video:", "Audio caption of the same video:")
        a = _section(user, "Audio caption of the same video:", "Combine them")
        return "fuse_audio_visual", f"{v} Meanwhile, {a[0].lower()}{a[1:]}"
    if user.startswith("ROLE:"):
        ctx = _section(user, "CONTEXT (", "Reply with JSON only").split(":", 1)[1].strip()
        if "complex question" in user and "audio clip" in user:
            return "reasoning_A", json.dumps({"conversations": [{"question": "Why did the market move?", "answer": OFF_TOPIC}]})
        if "conversation of" in user:
            n = int(re.search(r"conversation of (\d+)", user).group(1))
            pairs = [{"question": f"What is going on, part {i + 1}?", "answer": ctx} for i in range(n)]
            kind = "conversation_V" if "visual caption of the video" in user else "conversation"
            return kind, json.dumps({"conversations": pairs})
        kind = "reasoning" if "complex question" in user else "description"
        q = "Why does this happen?" if kind == "reasoning" else "Describe it in detail."
        return kind, "Here you go:\n```json\n" + json.dumps({"conversations": [{"question": q, "answer": ctx}]}) + "\n```"
    if "Rate the generated data" in user:
        low = "Generated conversation data" in user and "(visual caption of the video)" in user
        return "judge", json.dumps({"completeness": 4, "logic": 5, "fluency": 2 if low else 4, "reason": "ok"})
    return "other", "I cannot help with that."


def _completion(n: int, body: dict, text: str) -> dict:
    """A chat.completion object; tokens counted as words (the client just adds what it is told)."""
    prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
    return {
        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                  "total_tokens": prompt_tokens + len(text.split())},
    }


class ChatServer:
    """`ThreadingHTTPServer` on 127.0.0.1 speaking POST /v1/chat/completions."""

    def __init__(self, slow_s: float = 0.0, respond=None):
        """`respond(body, n)` -> (status, reply text) replaces the scripted behaviour (unit tests);
        status 0 closes the connection without a reply."""
        self.requests: list[dict] = []  # every request: {"kind", "status"}
        self.lock = threading.Lock()
        self.slow_s = slow_s
        self.truncated_once = False
        self.slowed_once = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if respond is not None:
                    with server.lock:
                        n = len(server.requests)
                        server.requests.append({"kind": "scripted", "status": None, "slow": False, "truncated": False})
                    status, text = respond(body, n)  # outside the lock: requests overlap as they arrive
                    server.requests[n]["status"] = status
                    if status == 0:  # drop the connection without a reply (a dying server, a proxy)
                        self.close_connection = True
                        return None
                    if status != 200:
                        return self._send(status, {"error": {"message": text, "type": "test"}})
                    return self._send(200, _completion(n, body, text))
                kind, text = answer(body["messages"])
                with server.lock:
                    n = len(server.requests)
                    slow = kind == "judge" and not server.slowed_once and server.slow_s > 0
                    server.slowed_once |= slow
                    truncate = kind == "reasoning" and len(body["messages"]) == 2 and not server.truncated_once
                    server.truncated_once |= truncate
                    status = 500 if n == 0 else 429 if n == 1 else 200
                    server.requests.append({"kind": kind, "status": status, "slow": slow, "truncated": truncate})
                if status == 500:
                    return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                if status == 429:
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "0"})
                if slow:
                    time.sleep(server.slow_s)
                if truncate:
                    text = 'Sure! {"conversations": [{"question": "Why", "answer": "Because'
                self._send(200, _completion(n, body, text))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def kinds(self, status: int = 200) -> list[str]:
        with self.lock:
            return [r["kind"] for r in self.requests if r["status"] == status]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
