# One customer managed KMS key encrypts the S3 bucket, both databases,
# Performance Insights, the ECR repositories and the CloudWatch log groups.

resource "aws_kms_key" "main" {
  description             = "${local.name}: S3 datastore, databases, ECR and logs"
  deletion_window_in_days = 30
  enable_key_rotation     = true
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "main" {
  name          = "alias/${local.name}"
  target_key_id = aws_kms_key.main.key_id
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy applies only to the key it is attached to, so Resource "*" here means this one key.
  #checkov:skip=CKV_AWS_111:A key policy applies only to the key it is attached to, so Resource "*" here means this one key.
  #checkov:skip=CKV_AWS_356:A key policy applies only to the key it is attached to, so Resource "*" here means this one key.
  # A key policy must name the key as "*". This statement lets IAM policies in
  # this account grant use of the key. Without it only the key policy could.
  statement {
    sid       = "AccountAdministersKeyThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsThisAccountsLogGroups"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"]
    }
  }
}

# Metaflow datastore (artifacts, code packages) and trained model packages.
resource "aws_s3_bucket" "datastore" {
  #checkov:skip=CKV_AWS_18:Server access logs would record every small Metaflow artifact read and write; CloudTrail S3 data events are the audit trail to enable where one is needed.
  #checkov:skip=CKV_AWS_144:The bucket holds reproducible run artifacts and model packages; cross-region replication would double storage cost without a recovery need.
  #checkov:skip=CKV2_AWS_62:No consumer subscribes to object events; Metaflow and the flow read the bucket directly.
  bucket = "${local.name}-${local.account_id}-${local.region}"

  # While false, terraform destroy fails on a bucket that holds objects.
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_ownership_controls" "datastore" {
  bucket = aws_s3_bucket.datastore.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "datastore" {
  bucket = aws_s3_bucket.datastore.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "datastore" {
  bucket = aws_s3_bucket.datastore.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "datastore" {
  bucket = aws_s3_bucket.datastore.id

  rule {
    bucket_key_enabled = true

    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.main.arn
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "datastore" {
  bucket = aws_s3_bucket.datastore.id

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = 30
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.datastore]
}

resource "aws_s3_bucket_policy" "datastore" {
  bucket = aws_s3_bucket.datastore.id
  policy = data.aws_iam_policy_document.datastore_bucket.json

  depends_on = [aws_s3_bucket_public_access_block.datastore]
}

data "aws_iam_policy_document" "datastore_bucket" {
  statement {
    sid     = "DenyRequestsWithoutTls"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.datastore.arn,
      "${aws_s3_bucket.datastore.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

locals {
  datastore_sysroot = "s3://${aws_s3_bucket.datastore.bucket}/metaflow"
  datatools_root    = "s3://${aws_s3_bucket.datastore.bucket}/data"
}
