locals {
  metadata_service_url = "${local.url_scheme}://${aws_lb.metaflow.dns_name}:${local.metadata_port}"
  ui_url               = "${local.url_scheme}://${aws_lb.metaflow.dns_name}:${local.ui_port}"
  training_image       = "${aws_ecr_repository.main["training"].repository_url}:${var.training_image_tag}"
  serving_image        = "${aws_ecr_repository.main["serving"].repository_url}:${var.serving_image_tag}"
}

output "datastore_bucket" {
  description = "Name of the S3 bucket that holds the Metaflow datastore and model packages."
  value       = aws_s3_bucket.datastore.bucket
}

output "kms_key_arn" {
  description = "ARN of the KMS key that encrypts the bucket, databases, ECR repositories and log groups."
  value       = aws_kms_key.main.arn
}

output "aurora_secret_arn" {
  description = "ARN of the Secrets Manager secret (JSON keys username and password) of the Aurora MySQL Optuna database."
  value       = local.aurora_secret_arn
}

output "aurora_endpoint" {
  description = "Writer endpoint host name of the Aurora MySQL Optuna cluster (port 3306)."
  value       = aws_rds_cluster.optuna.endpoint
}

output "aurora_database_name" {
  description = "Name of the Aurora MySQL database that holds the Optuna study."
  value       = aws_rds_cluster.optuna.database_name
}

# The RDS-managed secret holds only username and password, so this URL (no
# password) carries the host and database for the flow's --storage option.
output "optuna_storage_url" {
  description = "Optuna storage URL of the Aurora database without a password, for the flow's --storage option."
  value       = "mysql+pymysql://${var.aurora_master_username}@${aws_rds_cluster.optuna.endpoint}:3306/${var.aurora_database_name}"
}

output "cpu_job_queue" {
  description = "Name of the AWS Batch job queue on CPU instances, the default queue in metaflow_config."
  value       = aws_batch_job_queue.main["cpu"].name
}

output "gpu_job_queue" {
  description = "Name of the AWS Batch job queue on NVIDIA GPU instances, for @batch(queue=...) on the training step."
  value       = aws_batch_job_queue.main["gpu"].name
}

output "batch_job_role_arn" {
  description = "ARN of the IAM role that Metaflow tasks on AWS Batch assume (METAFLOW_ECS_S3_ACCESS_IAM_ROLE)."
  value       = aws_iam_role.batch_job.arn
}

output "sagemaker_role_arn" {
  description = "ARN of the SageMaker execution role for training jobs and the endpoint."
  value       = aws_iam_role.sagemaker.arn
}

output "operator_policy_arn" {
  description = "ARN of the IAM policy to attach to the user or role that launches the flow."
  value       = aws_iam_policy.operator.arn
}

output "training_repository_url" {
  description = "URI of the ECR repository for the training image, without a tag."
  value       = aws_ecr_repository.main["training"].repository_url
}

output "serving_repository_url" {
  description = "URI of the ECR repository for the serving image, without a tag."
  value       = aws_ecr_repository.main["serving"].repository_url
}

output "private_subnet_ids" {
  description = "IDs of the private subnets for SageMaker jobs that need the Aurora database."
  value       = aws_subnet.private[*].id
}

output "sagemaker_security_group_id" {
  description = "ID of the security group that Aurora admits, for SageMaker jobs launched into the VPC."
  value       = aws_security_group.sagemaker.id
}

output "metadata_service_url" {
  description = "URL of the Metaflow metadata service (METAFLOW_SERVICE_URL)."
  value       = local.metadata_service_url
}

output "ui_url" {
  description = "URL of the Metaflow UI, reachable from allowed_cidrs."
  value       = local.ui_url
}

output "metaflow_config" {
  description = "Metaflow configuration JSON. Write it to ~/.metaflowconfig/config.json or load it with `metaflow configure import`."
  value = jsonencode({
    METAFLOW_DEFAULT_DATASTORE      = "s3"
    METAFLOW_DATASTORE_SYSROOT_S3   = local.datastore_sysroot
    METAFLOW_DATATOOLS_S3ROOT       = local.datatools_root
    METAFLOW_DEFAULT_METADATA       = "service"
    METAFLOW_SERVICE_URL            = local.metadata_service_url
    METAFLOW_SERVICE_INTERNAL_URL   = local.metadata_service_url
    METAFLOW_BATCH_JOB_QUEUE        = aws_batch_job_queue.main["cpu"].name
    METAFLOW_ECS_S3_ACCESS_IAM_ROLE = aws_iam_role.batch_job.arn
    METAFLOW_BATCH_CONTAINER_IMAGE  = local.training_image
  })
}

output "flow_options" {
  description = "Command-line options that connect flows/income_flow.py to this stack's Aurora database and secret, SageMaker role and images. The secret RDS manages holds only the user name and password, so --storage names the host and database."
  value = join(" ", [
    "--storage", "mysql+pymysql://${aws_rds_cluster.optuna.endpoint}:3306/${var.aurora_database_name}",
    "--storage-secret", local.aurora_secret_arn,
    "--sagemaker-role", aws_iam_role.sagemaker.arn,
    "--training-image", local.training_image,
    "--serving-image", local.serving_image,
  ])
}
