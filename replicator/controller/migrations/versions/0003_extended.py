"""extended replication: a cloud pair's extended leg to a third cloud, and each machine's extended host

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 13:45:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('extended_pairs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pair_id', sa.Integer(), nullable=False),
    sa.Column('cloud_id', sa.Integer(), nullable=False),
    sa.Column('frequency', sa.Integer(), nullable=False),
    sa.Column('additional_points', sa.Integer(), nullable=False),
    sa.Column('compression', sa.Boolean(), nullable=False),
    sa.Column('bandwidth_limit', sa.BigInteger(), nullable=True),
    sa.Column('auth', sa.String(length=16), nullable=False),
    sa.Column('storage', sa.String(length=1024), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("auth IN ('certificate', 'kerberos')", name=op.f('ck_extended_pairs_auth_allowed')),
    sa.CheckConstraint('frequency IN (300, 900)', name=op.f('ck_extended_pairs_frequency_allowed')),
    sa.ForeignKeyConstraint(['cloud_id'], ['clouds.id'], name=op.f('fk_extended_pairs_cloud_id_clouds'),
                            ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['pair_id'], ['cloud_pairs.id'], name=op.f('fk_extended_pairs_pair_id_cloud_pairs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_extended_pairs')),
    sa.UniqueConstraint('cloud_id', name=op.f('uq_extended_pairs_cloud_id')),
    sa.UniqueConstraint('pair_id', name=op.f('uq_extended_pairs_pair_id'))
    )
    op.create_table('extended_placements',
    sa.Column('machine_id', sa.Integer(), nullable=False),
    sa.Column('host_id', sa.String(length=64), nullable=False),
    sa.Column('placed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_extended_placements_host_id_hosts'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.id'], name=op.f('fk_extended_placements_machine_id_machines'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('machine_id', name=op.f('pk_extended_placements'))
    )
    with op.batch_alter_table('extended_placements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_extended_placements_host_id'), ['host_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('extended_placements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_extended_placements_host_id'))
    op.drop_table('extended_placements')
    op.drop_table('extended_pairs')
