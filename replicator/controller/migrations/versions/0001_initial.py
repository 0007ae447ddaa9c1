"""initial schema: sites, hosts, registration keys, clouds, pairs, policies, mappings, machines, jobs, plans, tokens, audit

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-05 10:10:50.352940
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("role IN ('read-only', 'operator', 'admin')", name=op.f('ck_api_tokens_role_allowed')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('name', name=op.f('uq_api_tokens_name')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=255), nullable=False),
    sa.Column('outcome', sa.String(length=255), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)

    op.create_table('cloud_pairs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cloud_pairs')),
    sa.UniqueConstraint('name', name=op.f('uq_cloud_pairs_name'))
    )
    op.create_table('protection_policies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('target_kind', sa.String(length=16), nullable=False),
    sa.Column('frequency', sa.Integer(), nullable=False),
    sa.Column('additional_points', sa.Integer(), nullable=False),
    sa.Column('app_consistent_hours', sa.Integer(), nullable=False),
    sa.Column('compression', sa.Boolean(), nullable=False),
    sa.Column('auth', sa.String(length=16), nullable=False),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('initial_method', sa.String(length=16), nullable=False),
    sa.Column('initial_at', sa.String(length=64), nullable=True),
    sa.Column('initial_seed_dir', sa.String(length=1024), nullable=True),
    sa.Column('initial_path', sa.String(length=1024), nullable=True),
    sa.Column('delete_replica_on_remove', sa.Boolean(), nullable=False),
    sa.Column('bandwidth_limit', sa.BigInteger(), nullable=True),
    sa.Column('resync', sa.String(length=16), nullable=False),
    sa.Column('resync_window', sa.String(length=16), nullable=True),
    sa.Column('azure_storage_account', sa.String(length=64), nullable=True),
    sa.Column('azure_container', sa.String(length=64), nullable=True),
    sa.Column('azure_encrypt', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("auth IN ('certificate', 'kerberos')", name=op.f('ck_protection_policies_auth_allowed')),
    sa.CheckConstraint("initial_method IN ('network', 'scheduled', 'offline', 'existing')", name=op.f('ck_protection_policies_initial_method_allowed')),
    sa.CheckConstraint("resync IN ('auto', 'manual')", name=op.f('ck_protection_policies_resync_allowed')),
    sa.CheckConstraint("target_kind IN ('peer', 'azure')", name=op.f('ck_protection_policies_target_kind_allowed')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_protection_policies')),
    sa.UniqueConstraint('name', name=op.f('uq_protection_policies_name'))
    )
    op.create_table('sites',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sites')),
    sa.UniqueConstraint('name', name=op.f('uq_sites_name'))
    )
    op.create_table('clouds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('pair_id', sa.Integer(), nullable=True),
    sa.Column('pair_role', sa.String(length=16), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("pair_role IN ('primary', 'recovery')", name=op.f('ck_clouds_pair_role_allowed')),
    sa.ForeignKeyConstraint(['pair_id'], ['cloud_pairs.id'], name=op.f('fk_clouds_pair_id_cloud_pairs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_clouds_site_id_sites'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clouds')),
    sa.UniqueConstraint('name', name=op.f('uq_clouds_name')),
    sa.UniqueConstraint('pair_id', 'pair_role', name=op.f('uq_clouds_pair_id_pair_role'))
    )
    with op.batch_alter_table('clouds', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_clouds_pair_id'), ['pair_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_clouds_site_id'), ['site_id'], unique=False)

    op.create_table('network_mappings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pair_id', sa.Integer(), nullable=False),
    sa.Column('source_network', sa.String(length=255), nullable=False),
    sa.Column('target_network', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['pair_id'], ['cloud_pairs.id'], name=op.f('fk_network_mappings_pair_id_cloud_pairs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_network_mappings')),
    sa.UniqueConstraint('pair_id', 'source_network', name=op.f('uq_network_mappings_pair_id_source_network'))
    )
    with op.batch_alter_table('network_mappings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_network_mappings_pair_id'), ['pair_id'], unique=False)

    op.create_table('policy_associations',
    sa.Column('pair_id', sa.Integer(), nullable=False),
    sa.Column('policy_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['pair_id'], ['cloud_pairs.id'], name=op.f('fk_policy_associations_pair_id_cloud_pairs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['policy_id'], ['protection_policies.id'], name=op.f('fk_policy_associations_policy_id_protection_policies'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('pair_id', name=op.f('pk_policy_associations'))
    )
    with op.batch_alter_table('policy_associations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_policy_associations_policy_id'), ['policy_id'], unique=False)

    op.create_table('recovery_plans',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('pair_id', sa.Integer(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['pair_id'], ['cloud_pairs.id'], name=op.f('fk_recovery_plans_pair_id_cloud_pairs'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_recovery_plans')),
    sa.UniqueConstraint('name', name=op.f('uq_recovery_plans_name'))
    )
    with op.batch_alter_table('recovery_plans', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_recovery_plans_pair_id'), ['pair_id'], unique=False)

    op.create_table('storage_mappings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pair_id', sa.Integer(), nullable=False),
    sa.Column('source_root', sa.String(length=1024), nullable=False),
    sa.Column('target_root', sa.String(length=1024), nullable=False),
    sa.ForeignKeyConstraint(['pair_id'], ['cloud_pairs.id'], name=op.f('fk_storage_mappings_pair_id_cloud_pairs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_storage_mappings')),
    sa.UniqueConstraint('pair_id', 'source_root', name=op.f('uq_storage_mappings_pair_id_source_root'))
    )
    with op.batch_alter_table('storage_mappings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_storage_mappings_pair_id'), ['pair_id'], unique=False)

    op.create_table('hosts',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('cloud_id', sa.Integer(), nullable=True),
    sa.Column('admin_url', sa.String(length=512), nullable=True),
    sa.Column('data_url', sa.String(length=512), nullable=True),
    sa.Column('cert_serial', sa.String(length=64), nullable=True),
    sa.Column('cert_not_after', sa.DateTime(timezone=True), nullable=True),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_report', sa.JSON(), nullable=True),
    sa.Column('desired_revision', sa.Integer(), nullable=False),
    sa.Column('applied_revision', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['cloud_id'], ['clouds.id'], name=op.f('fk_hosts_cloud_id_clouds'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_hosts_site_id_sites'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hosts')),
    sa.UniqueConstraint('hostname', name=op.f('uq_hosts_hostname'))
    )
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hosts_cloud_id'), ['cloud_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hosts_site_id'), ['site_id'], unique=False)

    op.create_table('plan_groups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['plan_id'], ['recovery_plans.id'], name=op.f('fk_plan_groups_plan_id_recovery_plans'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plan_groups')),
    sa.UniqueConstraint('plan_id', 'position', name=op.f('uq_plan_groups_plan_id_position'))
    )
    with op.batch_alter_table('plan_groups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_plan_groups_plan_id'), ['plan_id'], unique=False)

    op.create_table('machines',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('cloud_id', sa.Integer(), nullable=False),
    sa.Column('primary_host_id', sa.String(length=64), nullable=True),
    sa.Column('replica_host_id', sa.String(length=64), nullable=True),
    sa.Column('domain', sa.String(length=255), nullable=True),
    sa.Column('disks', sa.JSON(), nullable=False),
    sa.Column('excluded', sa.JSON(), nullable=False),
    sa.Column('policy_id', sa.Integer(), nullable=True),
    sa.Column('desired_state', sa.String(length=16), nullable=False),
    sa.Column('resync_requested', sa.Integer(), nullable=False),
    sa.Column('observed_state', sa.String(length=64), nullable=True),
    sa.Column('health', sa.String(length=32), nullable=True),
    sa.Column('rpo_seconds', sa.Float(), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('observed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('owner_site_id', sa.Integer(), nullable=True),
    sa.Column('fencing_epoch', sa.Integer(), nullable=False),
    sa.Column('owner_lease_expires', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("desired_state IN ('enabled', 'paused', 'disabled')", name=op.f('ck_machines_desired_state_allowed')),
    sa.ForeignKeyConstraint(['cloud_id'], ['clouds.id'], name=op.f('fk_machines_cloud_id_clouds'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['owner_site_id'], ['sites.id'], name=op.f('fk_machines_owner_site_id_sites'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['policy_id'], ['protection_policies.id'], name=op.f('fk_machines_policy_id_protection_policies'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['primary_host_id'], ['hosts.id'], name=op.f('fk_machines_primary_host_id_hosts'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['replica_host_id'], ['hosts.id'], name=op.f('fk_machines_replica_host_id_hosts'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_machines')),
    sa.UniqueConstraint('name', name=op.f('uq_machines_name'))
    )
    with op.batch_alter_table('machines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_machines_cloud_id'), ['cloud_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_machines_primary_host_id'), ['primary_host_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_machines_replica_host_id'), ['replica_host_id'], unique=False)

    op.create_table('plan_actions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('group_id', sa.Integer(), nullable=False),
    sa.Column('phase', sa.String(length=8), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('action_kind', sa.String(length=8), nullable=False),
    sa.Column('script', sa.JSON(), nullable=True),
    sa.Column('manual', sa.Text(), nullable=True),
    sa.Column('timeout', sa.Float(), nullable=True),
    sa.Column('kinds', sa.JSON(), nullable=True),
    sa.CheckConstraint("action_kind IN ('script', 'manual')", name=op.f('ck_plan_actions_action_kind_allowed')),
    sa.CheckConstraint("phase IN ('pre', 'post')", name=op.f('ck_plan_actions_phase_allowed')),
    sa.ForeignKeyConstraint(['group_id'], ['plan_groups.id'], name=op.f('fk_plan_actions_group_id_plan_groups'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plan_actions'))
    )
    with op.batch_alter_table('plan_actions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_plan_actions_group_id'), ['group_id'], unique=False)

    op.create_table('registration_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('site_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('used_by', sa.String(length=64), nullable=True),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['site_id'], ['sites.id'], name=op.f('fk_registration_keys_site_id_sites'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['used_by'], ['hosts.id'], name=op.f('fk_registration_keys_used_by_hosts'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_registration_keys')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_registration_keys_token_hash'))
    )
    with op.batch_alter_table('registration_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_registration_keys_site_id'), ['site_id'], unique=False)

    op.create_table('plan_members',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.Integer(), nullable=False),
    sa.Column('group_id', sa.Integer(), nullable=False),
    sa.Column('machine_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['group_id'], ['plan_groups.id'], name=op.f('fk_plan_members_group_id_plan_groups'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.id'], name=op.f('fk_plan_members_machine_id_machines'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['plan_id'], ['recovery_plans.id'], name=op.f('fk_plan_members_plan_id_recovery_plans'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plan_members')),
    sa.UniqueConstraint('plan_id', 'machine_id', name=op.f('uq_plan_members_plan_id_machine_id'))
    )
    with op.batch_alter_table('plan_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_plan_members_group_id'), ['group_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_plan_members_machine_id'), ['machine_id'], unique=False)

    op.create_table('plan_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=24), nullable=False),
    sa.Column('current_group', sa.Integer(), nullable=False),
    sa.Column('waiting_action_id', sa.Integer(), nullable=True),
    sa.Column('confirmations', sa.JSON(), nullable=False),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('test', 'planned', 'unplanned')", name=op.f('ck_plan_runs_kind_allowed')),
    sa.CheckConstraint("state IN ('queued', 'running', 'waiting_for_input', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_plan_runs_state_allowed')),
    sa.ForeignKeyConstraint(['plan_id'], ['recovery_plans.id'], name=op.f('fk_plan_runs_plan_id_recovery_plans'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['waiting_action_id'], ['plan_actions.id'], name=op.f('fk_plan_runs_waiting_action_id_plan_actions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plan_runs'))
    )
    with op.batch_alter_table('plan_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_plan_runs_plan_id'), ['plan_id'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=24), nullable=False),
    sa.Column('machine_id', sa.Integer(), nullable=True),
    sa.Column('plan_run_id', sa.Integer(), nullable=True),
    sa.Column('host_id', sa.String(length=64), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('progress', sa.Integer(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('claimed_by', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'waiting_for_input')", name=op.f('ck_jobs_state_allowed')),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_jobs_host_id_hosts'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.id'], name=op.f('fk_jobs_machine_id_machines'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['plan_run_id'], ['plan_runs.id'], name=op.f('fk_jobs_plan_run_id_plan_runs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_host_id'), ['host_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_machine_id'), ['machine_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_plan_run_id'), ['plan_run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)

    op.create_table('job_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('line', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_log_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_log'))
    )
    with op.batch_alter_table('job_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_log_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('job_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_log_job_id'))

    op.drop_table('job_log')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_jobs_plan_run_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_machine_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_kind'))
        batch_op.drop_index(batch_op.f('ix_jobs_host_id'))

    op.drop_table('jobs')
    with op.batch_alter_table('plan_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_plan_runs_plan_id'))

    op.drop_table('plan_runs')
    with op.batch_alter_table('plan_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_plan_members_machine_id'))
        batch_op.drop_index(batch_op.f('ix_plan_members_group_id'))

    op.drop_table('plan_members')
    with op.batch_alter_table('registration_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_registration_keys_site_id'))

    op.drop_table('registration_keys')
    with op.batch_alter_table('plan_actions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_plan_actions_group_id'))

    op.drop_table('plan_actions')
    with op.batch_alter_table('machines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_machines_replica_host_id'))
        batch_op.drop_index(batch_op.f('ix_machines_primary_host_id'))
        batch_op.drop_index(batch_op.f('ix_machines_cloud_id'))

    op.drop_table('machines')
    with op.batch_alter_table('plan_groups', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_plan_groups_plan_id'))

    op.drop_table('plan_groups')
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hosts_site_id'))
        batch_op.drop_index(batch_op.f('ix_hosts_cloud_id'))

    op.drop_table('hosts')
    with op.batch_alter_table('storage_mappings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_storage_mappings_pair_id'))

    op.drop_table('storage_mappings')
    with op.batch_alter_table('recovery_plans', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_recovery_plans_pair_id'))

    op.drop_table('recovery_plans')
    with op.batch_alter_table('policy_associations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_policy_associations_policy_id'))

    op.drop_table('policy_associations')
    with op.batch_alter_table('network_mappings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_network_mappings_pair_id'))

    op.drop_table('network_mappings')
    with op.batch_alter_table('clouds', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_clouds_site_id'))
        batch_op.drop_index(batch_op.f('ix_clouds_pair_id'))

    op.drop_table('clouds')
    op.drop_table('sites')
    op.drop_table('protection_policies')
    op.drop_table('cloud_pairs')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
    op.drop_table('api_tokens')
