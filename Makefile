# gst-liveavatar: `make demo` and `make test` do all their own set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
BUILD := build

.PHONY: all setup build demo test bench clean

all: build

setup:
	@scripts/setup.sh

build: setup
	@echo "[build] compiling (ninja -C $(BUILD))"
	@ninja -C $(BUILD)

# examples/assets/portrait.png + speech.wav -> demo.mp4 (H.264 + AAC, 25 fps, as long as the audio)
demo: build
	@pipelines/file-to-mp4.sh examples/assets/portrait.png examples/assets/speech.wav demo.mp4
	@ffprobe -v error -show_entries stream=codec_name,r_frame_rate,nb_frames:format=duration -of compact demo.mp4

test: build
	@scripts/run-tests.sh $(BUILD)

bench: build
	@$(BUILD)/engine/tools/bench/liveavatar-bench --image examples/assets/portrait.png --audio examples/assets/speech.wav --size 512x512 --threads 1

clean:
	rm -rf $(BUILD) demo.mp4
