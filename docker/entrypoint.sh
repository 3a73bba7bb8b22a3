#!/bin/sh
# Container start: fetch the models into the /models volume when absent, then run asr-server.
#   ASR_SERVER_PULL=never      skip the pull (the files are placed on the volume by hand)
#   ASR_SERVER_PULL_ARGS=...   extra `models pull` flags, e.g. "--source hf" or "--endpoint URL"
# `asr-server models pull` downloads nothing and stays offline when every file is present.
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve
fi

if [ "$1" = "serve" ]; then
    if [ "${ASR_SERVER_PULL:-auto}" != "never" ]; then
        # Word splitting of the extra flags is wanted here.
        # shellcheck disable=SC2086
        asr-server models pull ${ASR_SERVER_PULL_ARGS:-}
    fi
    # Serving never goes online, whatever a library underneath might try.
    export HF_HUB_OFFLINE=1
fi

exec asr-server "$@"
