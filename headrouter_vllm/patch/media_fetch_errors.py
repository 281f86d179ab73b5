"""Patch: a media URL the server cannot load is the client's problem, answered 4xx with what went wrong.

vLLM 0.32's ``MediaConnector.load_from_url`` / ``load_from_url_async`` turn a 4xx from the media host into a 422,
but let through, as 500s: a ``file://`` URL on a server started without ``--allowed-local-media-path`` (a
``RuntimeError``), a host that cannot be resolved or reached, a fetch that times out, and a 5xx / 408 / 429 from the
host (kept as they are upstream "for retry logic", which the OpenAI server does not have). We wrap both methods and
re-raise those as vLLM's own client errors, which its error handler answers as such: local files not allowed ->
400 naming the flag; unreachable, timeout, the host's 5xx/408/429 -> 422 naming the URL and the cause. Fetching
stays vLLM's (same client, limits, redirects and cache); any other exception passes through unchanged.

Applied by the HeadRouter middleware, in the API server process (where vLLM fetches media), so a plain
``vllm serve`` is untouched.
"""

from __future__ import annotations

import asyncio
import functools

LOCAL_FILES_MESSAGE = "Cannot load local files without `--allowed-local-media-path`."


def _what(media_io) -> str:
    """``audio`` for AudioMediaIO, ``image`` for ImageMediaIO, ...: the part of the request the URL came from."""
    name = type(media_io).__name__.removesuffix("MediaIO").lower()
    return name or "media"


def client_error(exc: BaseException, url: str, media_io, timeout: float | None) -> Exception | None:
    """vLLM's client error for a fetch failure that is the URL's, not the server's; None for anything else."""
    import aiohttp
    import requests
    from vllm.exceptions import VLLMUnprocessableEntityError, VLLMValidationError

    what = _what(media_io)
    parameter = f"{what}_url"
    shown = url if len(url) <= 200 else url[:200] + "..."
    if isinstance(exc, RuntimeError) and str(exc) == LOCAL_FILES_MESSAGE:
        return VLLMValidationError(f"{parameter}: this server does not load local files (file:// URLs); send the "
                                   f"{what} inline, as an http(s) URL, or start the server with "
                                   "--allowed-local-media-path DIR", parameter=parameter, value=shown)
    cause = None
    if isinstance(exc, VLLMUnprocessableEntityError):
        if exc.parameter != "image_url" or what == "image":
            return None
        # vLLM names every media URL "image_url": name the part the URL is in, and the cause
        upstream = exc.__cause__
        if isinstance(upstream, aiohttp.ClientResponseError):
            cause = f"its host answered HTTP {upstream.status}"
        elif isinstance(upstream, requests.HTTPError) and upstream.response is not None:
            cause = f"its host answered HTTP {upstream.response.status_code}"
        else:
            cause = exc.args[0].removeprefix("Failed to fetch media from URL: ") if exc.args else "unknown cause"
    elif isinstance(exc, aiohttp.ClientResponseError | requests.HTTPError):
        status = exc.status if isinstance(exc, aiohttp.ClientResponseError) else getattr(exc.response, "status_code",
                                                                                         None)
        if status is not None and (status >= 500 or status in (408, 429)):
            cause = f"its host answered HTTP {status}, also when retried (try again later)"
        elif status is not None:
            cause = f"its host answered HTTP {status}"
    elif isinstance(exc, asyncio.TimeoutError | TimeoutError | requests.Timeout):
        limit = f"={timeout:g} s" if timeout else ""
        # vLLM has retried by then (VLLM_MEDIA_FETCH_MAX_RETRIES attempts, each allowed 4x longer than the last)
        cause = f"the fetch timed out (VLLM_{what.upper()}_FETCH_TIMEOUT{limit} for the first attempt, with retries)"
    elif url[:5].lower() == "file:" and isinstance(exc, OSError):
        cause = f"the file could not be read ({type(exc).__name__}: {str(exc)[:200]})"
    elif isinstance(exc, aiohttp.ClientConnectionError | requests.ConnectionError | OSError):
        cause = f"its host could not be reached ({type(exc).__name__}: {str(exc)[:200]})"
    if cause is None:
        return None
    # the message names the URL: no ``value`` (vLLM's handler would append it again)
    return VLLMUnprocessableEntityError(f"{parameter}: could not fetch the {what} from {shown}: {cause}",
                                        parameter=parameter)


def _reraise(exc: Exception, url: str, media_io, timeout: float | None):
    """Raise the client error for ``exc`` (from it), or ``exc`` itself when it is not the URL's fault."""
    mapped = client_error(exc, url, media_io, timeout)
    if mapped is None:
        raise exc
    raise mapped from exc


def apply():
    from vllm.multimodal.media.connector import MediaConnector

    sync_original = MediaConnector.load_from_url
    async_original = MediaConnector.load_from_url_async

    @functools.wraps(sync_original)
    def load_from_url(self, url, media_io, *, fetch_timeout=None):
        try:
            return sync_original(self, url, media_io, fetch_timeout=fetch_timeout)
        except Exception as e:
            _reraise(e, url, media_io, fetch_timeout)

    @functools.wraps(async_original)
    async def load_from_url_async(self, url, media_io, *, fetch_timeout=None):
        try:
            return await async_original(self, url, media_io, fetch_timeout=fetch_timeout)
        except Exception as e:
            _reraise(e, url, media_io, fetch_timeout)

    MediaConnector.load_from_url = load_from_url
    MediaConnector.load_from_url_async = load_from_url_async

    def undo():
        MediaConnector.load_from_url = sync_original
        MediaConnector.load_from_url_async = async_original

    return undo
