"""PyAV back-end of the decoding contract (`media.py`): probing, frames, audio.

The reference decoder: it reads every codec and container FFmpeg reads, so it is the fallback of
the faster back-ends (`decode_torchcodec.py`, `decode_decord.py`) and of DALI for still images
and codecs DALI lacks. It seeks with a packet index built by demuxing (no decoding), so only the
GOPs that hold the wanted frames are decoded, and falls back to a plain sequential decode when a
file's timestamps can't be trusted.

Pixels: `pixels="swscale"` converts YUV to RGB with libswscale's default (what torchcodec and
decord also return, bit for bit); `pixels="dali"` converts 4:2:0 frames the way DALI does
(`media.yuv420_to_rgb`), for a DALI run's clips that DALI cannot decode itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np
import torch

from nemo_avllm.media import (
    DEFAULT_NUM_FRAMES,
    IMAGE_DEMUXERS,
    PIXEL_CONVENTIONS,
    SAMPLE_RATE,
    MediaError,
    MediaInfo,
    decode_threads,
    rotate_upright,
    sample_frame_indices,
    yuv420_to_rgb,
)

NAME = "pyav"


def available() -> bool:
    return True  # a core dependency




@dataclass
class _FrameIndex:
    """Presentation-ordered packet timestamps of the video stream (from demuxing only)."""

    pts: list[int | None]
    keyframe: list[bool]
    end_pts: int | None = None  # pts + duration of the last frame, for the duration

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def seekable(self) -> bool:
        """Frames can be found by pts only if every packet has a unique pts."""
        return bool(self.pts) and None not in self.pts and len(set(self.pts)) == len(self.pts)


def _open(path) -> av.container.InputContainer:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise MediaError(p, "file not found")
    try:
        return av.open(p, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise MediaError(p, f"not a readable media file ({e})") from e


def _video_stream(container, path):
    if not container.streams.video:
        raise MediaError(path, "no video stream")
    return container.streams.video[0]


def _scan_video(container, stream, path, audio=None, on_audio=None) -> _FrameIndex:
    """Demux (don't decode) the video stream: one packet per frame → exact count and pts index.
    With `audio` (a stream), its packets go to `on_audio` in the same pass (one read of the file)."""
    rows: list[tuple[int | None, bool]] = []
    end_pts = None
    packets = 0
    try:
        for pkt in container.demux(*([stream] if audio is None else [stream, audio])):
            if audio is not None and pkt.stream.index == audio.index:
                on_audio(pkt)  # flush packet included: it drains the audio decoder
                continue
            if pkt.size == 0:  # the flush packet at EOF
                continue
            packets += 1
            if pkt.is_discard:  # before an edit list's start (trimmed mp4): decoded, never shown
                continue
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            rows.append((ts, bool(pkt.is_keyframe)))
            if ts is not None and pkt.duration:
                end = ts + pkt.duration
                end_pts = end if end_pts is None else max(end_pts, end)
    except av.FFmpegError as e:
        raise MediaError(path, f"demuxing failed after {packets} video packets ({e})") from e
    if not rows:
        raise MediaError(path, "the video stream has no frames")
    declared = stream.frames or 0
    if container.format.name.split(",")[0] in ("mov", "mp4") and declared > packets:
        # mp4/mov headers list every sample; fewer packets on disk means the file was cut short.
        raise MediaError(path, f"truncated: the header lists {declared} frames, {packets} are on disk")
    if all(r[0] is not None for r in rows):
        rows.sort(key=lambda r: r[0])
    return _FrameIndex([r[0] for r in rows], [r[1] for r in rows], end_pts)


def _is_image(container) -> bool:
    return any(name in IMAGE_DEMUXERS for name in container.format.name.split(","))


def probe(path) -> MediaInfo:
    """Probe a video (or still image) once: frame count, fps, duration, size, rotation, audio."""
    p = os.fspath(path)
    with _open(p) as c:
        vs = _video_stream(c, p)
        index = _scan_video(c, vs, p)
        rotation = 0
        try:
            c.seek(0)
            for frame in c.decode(vs):  # one frame: rotation lives in frame side data
                rotation = int(frame.rotation or 0)
                break
            else:
                raise MediaError(p, "no decodable video frame")
        except av.FFmpegError as e:
            raise MediaError(p, f"decoding the first frame failed ({e})") from e
        tb = vs.time_base
        is_image = _is_image(c)
        duration = 0.0
        if index.seekable and tb is not None and index.num_frames > 1:
            end = index.end_pts if index.end_pts is not None else index.pts[-1]
            duration = float((end - index.pts[0]) * tb)
        if duration <= 0 and c.duration and not is_image:
            duration = c.duration / av.time_base
        fps = index.num_frames / duration if duration > 0 else 0.0
        return MediaInfo(
            path=p,
            num_frames=index.num_frames,
            fps=round(fps, 6),
            duration=round(duration, 6),
            width=int(vs.codec_context.width),
            height=int(vs.codec_context.height),
            rotation=rotation % 360,
            video_codec=vs.codec_context.name,
            container=c.format.name,
            is_image=bool(is_image),
            has_audio=bool(c.streams.audio),
            **_audio_fields(c),
        )


def _audio_fields(container) -> dict:
    if not container.streams.audio:
        return {"audio_channels": 0, "audio_sample_rate": 0, "audio_codec": None}
    cc = container.streams.audio[0].codec_context
    return {"audio_channels": int(cc.channels), "audio_sample_rate": int(cc.sample_rate or 0), "audio_codec": cc.name}


def probe_audio(path) -> dict | None:
    """Channels, rate and codec of a file's first audio stream (None without one), for a
    manifest's separate `audio` file."""
    with _open(path) as c:
        return _audio_fields(c) if c.streams.audio else None


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------


def _decode_skipping(container, stream, keep: set) -> Iterator["av.VideoFrame"]:
    """Frames of `stream` from the demuxer's position, in presentation order. A packet whose pts
    is not in `keep` goes to the decoder with `skip_frame=NONREF`: a frame no other frame refers
    to is then dropped undecoded (in H.264 with B-frames about half of them, bench/RESULTS.md),
    while every reference frame is decoded as usual, so the kept frames are bit-identical."""
    cc = stream.codec_context
    for pkt in container.demux(stream):
        # set per packet: libavcodec copies skip_frame to the (frame-threaded) decoder on submit
        cc.skip_frame = "DEFAULT" if pkt.size == 0 or pkt.pts is None or pkt.pts in keep else "NONREF"
        yield from cc.decode(pkt)


def _decode_seek(container, stream, index: _FrameIndex, wanted: list[int]) -> dict[int, "av.VideoFrame"] | None:
    """Decode the `wanted` presentation indices, seeking to the keyframe before a wanted frame
    whenever a keyframe lies between the decoder's position and that frame, and skipping the
    frames between that nothing refers to (:func:`_decode_skipping`). Returns None when the
    stream doesn't behave (frame missing or without pts): the caller decodes sequentially."""
    key_before, last_key = [], 0
    for i, k in enumerate(index.keyframe):
        last_key = i if k else last_key
        key_before.append(last_key)
    keep = {index.pts[t] for t in wanted}
    got: dict[int, av.VideoFrame] = {}
    frames_iter, last_pts = None, None
    for t in wanted:
        target = index.pts[t]
        key = key_before[t]
        if frames_iter is None or (last_pts is not None and index.pts[key] > last_pts):
            if key > 0:
                container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
            else:
                container.seek(0)  # the index scan left the demuxer at EOF
            frames_iter = _decode_skipping(container, stream, keep)
            last_pts = None
        for frame in frames_iter:
            if frame.pts is None:
                return None
            last_pts = frame.pts
            if frame.pts == target:
                got[t] = frame
                break
            if frame.pts > target:
                return None  # the wanted frame was not produced by the decoder
        else:
            return None
    return got


def _decode_sequential(container, stream, wanted: set[int]) -> tuple[dict[int, "av.VideoFrame"], int]:
    """Decode every frame from the start, keep the wanted ones; also returns the decoded count."""
    stream.codec_context.skip_frame = "DEFAULT"  # after a failed _decode_seek: count every frame
    container.seek(0)
    got, n = {}, 0
    for frame in container.decode(stream):
        if n in wanted:
            got[n] = frame
        n += 1
    return got, n


def _plane(plane) -> np.ndarray:
    """One 8-bit plane of a frame without its row padding, `[h, w]` uint8."""
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


def frames_to_rgb(frames: list, pixels: str = "swscale") -> np.ndarray:
    """Decoded frames → uint8 `[T, H, W, 3]` in the given pixel convention (`media.PIXEL_CONVENTIONS`).
    Only 8-bit 4:2:0 frames have a DALI conversion; others use libswscale in both conventions."""
    if pixels not in PIXEL_CONVENTIONS:
        raise ValueError(f"pixels must be one of {PIXEL_CONVENTIONS}, got {pixels!r}")
    if pixels == "dali" and frames and all(f.format.name == "yuv420p" for f in frames):
        y, u, v = (torch.from_numpy(np.stack([_plane(f.planes[i]) for f in frames])) for i in range(3))
        return yuv420_to_rgb(y, u, v).numpy()
    return np.stack([f.to_ndarray(format="rgb24") for f in frames])


def decode_video_frames(
    path, num_frames: int = DEFAULT_NUM_FRAMES, pixels: str = "swscale"
) -> tuple[np.ndarray, list[int], int]:
    """Decode T uniformly sampled frames, upright, as uint8 `[T, H, W, 3]`.

    Returns (frames, frame indices, number of frames in the video).
    """
    frames, indices, n, _ = read_clip(path, num_frames, None, pixels)
    return frames, indices, n


def read_clip(
    path, num_frames: int = DEFAULT_NUM_FRAMES, sample_rate: int | None = SAMPLE_RATE, pixels: str = "swscale"
) -> tuple[np.ndarray, list[int], int, np.ndarray | None]:
    """T sampled frames (as :func:`decode_video_frames`) and the container's whole audio track
    (as :func:`decode_audio`; None without audio or when `sample_rate` is None) from one open and
    one demuxing pass: the audio is decoded while the video packets are indexed.

    Returns (frames, frame indices, number of frames in the video, mono wave or None).
    """
    p = os.fspath(path)
    with _open(p) as c:
        vs = _video_stream(c, p)
        vs.thread_type = "AUTO"
        vs.codec_context.thread_count = decode_threads()
        astream = c.streams.audio[0] if sample_rate is not None and c.streams.audio else None
        chunks: list[np.ndarray] = []
        on_audio = None
        if astream is not None:
            mono = _Mono(sample_rate)

            def on_audio(pkt):
                try:
                    for frame in pkt.decode():
                        chunks.extend(mono.push(frame))
                except av.FFmpegError as e:
                    raise MediaError(p, f"audio decoding failed ({e})") from e
        try:
            index = _scan_video(c, vs, p, astream, on_audio)
            if astream is not None:
                chunks.extend(mono.flush())
            n = index.num_frames
            indices = sample_frame_indices(n, num_frames)
            wanted = sorted(set(indices))
            got = _decode_seek(c, vs, index, wanted) if index.seekable else None
            if got is None:
                got, decoded = _decode_sequential(c, vs, set(wanted))
                if decoded == 0:
                    raise MediaError(p, "no decodable video frame")
                if decoded < n:  # the decoder dropped packets: sample over what really decodes
                    n = decoded
                    indices = sample_frame_indices(n, num_frames)
                    got, _ = _decode_sequential(c, vs, set(indices))
            rotation = int(got[indices[0]].rotation or 0)  # display matrix / JPEG EXIF orientation
            order = sorted(got)  # == indices unless fewer frames than T repeat some
            frames = frames_to_rgb([got[i] for i in order], pixels)
            if order != indices:
                frames = frames[np.searchsorted(order, indices)]
        except av.FFmpegError as e:
            raise MediaError(p, f"video decoding failed ({e})") from e
    wave = np.concatenate(chunks) if chunks else None
    return rotate_upright(frames, rotation), indices, n, wave


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def iter_audio(path, sample_rate: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """The audio track as mono float32 chunks at `sample_rate` (mean of the channels, see
    :class:`_Mono`), about a second at a time, so a long track is never held whole (`prepare`
    streams it into the FLAC side-car). Nothing when the file has no audio stream."""
    p = os.fspath(path)
    with _open(p) as c:
        if not c.streams.audio:
            return
        stream = c.streams.audio[0]
        mono = _Mono(sample_rate)
        try:
            for frame in c.decode(stream):
                yield from mono.push(frame)
            yield from mono.flush()
        except av.FFmpegError as e:
            raise MediaError(p, f"audio decoding failed ({e})") from e


class _Mono:
    """Decoded audio frames → mono float32 chunks at `rate`. Frames are resampled in batches of
    about `batch` input samples: libswresample's output does not depend on how its input is cut
    (bit-identical, tests/data/test_media.py), and one call per 1024-sample AAC frame cost a
    quarter of the audio time (bench/RESULTS.md). Channels go through the resampler and are
    averaged after it, so the downmix is a plain mean."""

    def __init__(self, rate: int, batch: int = SAMPLE_RATE):
        self.resampler = av.AudioResampler(format="fltp", layout=None, rate=rate)
        self.batch = batch
        self.pending: list = []
        self.samples = 0

    def push(self, frame) -> list[np.ndarray]:
        """Take one decoded frame; returns the chunks that are ready."""
        out = self._drain() if self.pending and not _same_format(frame, self.pending[0]) else []
        self.pending.append(frame)
        self.samples += frame.samples
        return out + (self._drain() if self.samples >= self.batch else [])

    def flush(self) -> list[np.ndarray]:
        """The rest, at the end of the track."""
        return self._drain() + self._resample(None)

    def _drain(self) -> list[np.ndarray]:
        frames, self.pending, self.samples = self.pending, [], 0
        if not frames:
            return []
        first = frames[0]
        try:  # one frame holding the batch (a layout numpy cannot carry: frame by frame)
            batch = av.AudioFrame.from_ndarray(np.concatenate([f.to_ndarray() for f in frames], axis=1),
                                               format=first.format.name, layout=first.layout.name)
            batch.sample_rate = first.sample_rate
            frames = [batch]
        except (ValueError, TypeError, av.FFmpegError):
            pass
        return [chunk for f in frames for chunk in self._resample(f)]

    def _resample(self, frame) -> list[np.ndarray]:
        if frame is not None:
            frame.pts = None  # resample by sample count, immune to timestamp gaps
        return [f.to_ndarray().mean(axis=0).astype(np.float32, copy=False) for f in self.resampler.resample(frame)]


def _same_format(a, b) -> bool:
    return (a.format.name, a.layout.name, a.sample_rate) == (b.format.name, b.layout.name, b.sample_rate)


def decode_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """Whole audio track → mono float32 at `sample_rate` (`iter_audio`, joined); None when the
    file has no audio stream or the stream holds no samples."""
    chunks = list(iter_audio(path, sample_rate))
    return np.concatenate(chunks) if chunks else None
