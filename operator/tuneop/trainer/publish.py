"""output.s3: the finished adapter uploaded to S3 (tuneop.s3: its files, then tuneop-manifest.json, the
commit marker). Settings from the environment (the pod gets them from spec.storage.s3)."""
from __future__ import annotations

import sys
from typing import Any, Optional

from .. import s3
from .errors import OUTPUT_UPLOAD_FAILED, TrainerError


def publish_adapter(adapter: dict[str, Any], uri: Optional[str]) -> dict[str, Any]:
    """Upload the adapter directory ``adapter["path"]`` to ``uri`` (nothing when None) and return the
    termination message's adapter block with ``uri``. A failure is TrainerError(OutputUploadFailed): exit 2
    when retrying cannot help (a missing bucket, bad credentials), else 1 (the Job retries; the next run
    reuses the adapter on the volume and uploads it again)."""
    if not uri:
        return adapter
    print(f"tuneop: uploading the adapter to {uri}", file=sys.stderr)
    try:
        s3.upload_adapter(s3.Client(), adapter["path"], uri)
    except s3.S3Error as e:
        raise TrainerError(OUTPUT_UPLOAD_FAILED, f"cannot upload the adapter to output.s3.uri {uri}: {e}; "
                           "its tuneop-manifest.json is not there: the upload counts as not done",
                           user_error=e.client_error) from None
    except OSError as e:
        raise TrainerError(OUTPUT_UPLOAD_FAILED, f"cannot upload the adapter to output.s3.uri {uri}: {e}") from None
    print(f"tuneop: uploaded the adapter to {uri}", file=sys.stderr)
    return {**adapter, "uri": uri.rstrip("/")}
