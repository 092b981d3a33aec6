# Aurora MySQL Serverless v2 cluster that stores the shared Optuna study.
# RDS generates the master password and keeps it in a Secrets Manager secret
# (JSON keys "username" and "password"). The secret holds no host or database
# name, so those come from the aurora_endpoint and aurora_database_name outputs.

resource "aws_db_subnet_group" "private" {
  name        = "${local.name}-private"
  description = "Private subnets for the Aurora and metadata databases"
  subnet_ids  = aws_subnet.private[*].id
}

resource "aws_security_group" "aurora" {
  name        = "${local.name}-aurora"
  description = "Aurora MySQL Optuna database, reachable only from Batch and SageMaker"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${local.name}-aurora"
  }
}

resource "aws_vpc_security_group_ingress_rule" "aurora_from_compute" {
  for_each = local.compute_security_groups

  security_group_id            = aws_security_group.aurora.id
  description                  = "MySQL from ${each.key}"
  ip_protocol                  = "tcp"
  from_port                    = 3306
  to_port                      = 3306
  referenced_security_group_id = each.value
}

resource "aws_rds_cluster" "optuna" {
  #checkov:skip=CKV_AWS_326:Backtrack bills for every stored change record; point-in-time restore from automated backups covers recovery of the study.
  #checkov:skip=CKV2_AWS_8:Automated backups with backup_retention_days and point-in-time restore protect the study; an AWS Backup plan would add a second copy the study does not need.
  cluster_identifier = "${local.name}-optuna"
  engine             = "aurora-mysql"
  engine_mode        = "provisioned"
  engine_version     = var.aurora_engine_version
  database_name      = var.aurora_database_name
  master_username    = var.aurora_master_username

  manage_master_user_password = true

  db_subnet_group_name   = aws_db_subnet_group.private.name
  vpc_security_group_ids = [aws_security_group.aurora.id]

  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.main.arn
  iam_database_authentication_enabled = true
  deletion_protection                 = var.deletion_protection
  copy_tags_to_snapshot               = true
  backup_retention_period             = var.backup_retention_days
  preferred_backup_window             = "03:00-04:00"
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${local.name}-optuna-final"
  enabled_cloudwatch_logs_exports     = ["audit", "error", "slowquery"]

  serverlessv2_scaling_configuration {
    min_capacity = var.aurora_min_capacity
    max_capacity = var.aurora_max_capacity
  }

  depends_on = [aws_cloudwatch_log_group.aurora]
}

# RDS creates these log groups on first export without encryption or
# retention. Creating them first applies the KMS key and retention.
resource "aws_cloudwatch_log_group" "aurora" {
  for_each = toset(["audit", "error", "slowquery"])

  name              = "/aws/rds/cluster/${local.name}-optuna/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_rds_cluster_instance" "optuna" {
  count = 1

  identifier           = "${local.name}-optuna-${count.index}"
  cluster_identifier   = aws_rds_cluster.optuna.id
  engine               = aws_rds_cluster.optuna.engine
  engine_version       = aws_rds_cluster.optuna.engine_version
  instance_class       = "db.serverless"
  db_subnet_group_name = aws_db_subnet_group.private.name

  publicly_accessible        = false
  auto_minor_version_upgrade = true

  performance_insights_enabled    = true
  performance_insights_kms_key_id = aws_kms_key.main.arn
  monitoring_interval             = 60
  monitoring_role_arn             = aws_iam_role.rds_monitoring.arn
}
