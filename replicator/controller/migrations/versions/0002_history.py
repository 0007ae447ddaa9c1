"""history: RPO samples per machine and the replica host's latest recovery points per machine

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 13:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rpo_samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('machine_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('rpo_seconds', sa.Float(), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('pending_bytes', sa.BigInteger(), nullable=True),
    sa.Column('cycle_bytes', sa.BigInteger(), nullable=True),
    sa.Column('cycle_seconds', sa.Float(), nullable=True),
    sa.Column('health', sa.String(length=32), nullable=True),
    sa.Column('state', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.id'], name=op.f('fk_rpo_samples_machine_id_machines'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rpo_samples'))
    )
    with op.batch_alter_table('rpo_samples', schema=None) as batch_op:
        batch_op.create_index('ix_rpo_samples_machine_at', ['machine_id', 'at'], unique=False)

    op.create_table('machine_points',
    sa.Column('machine_id', sa.Integer(), nullable=False),
    sa.Column('host_id', sa.String(length=64), nullable=True),
    sa.Column('reported_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('points', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.id'], name=op.f('fk_machine_points_machine_id_machines'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_machine_points_host_id_hosts'),
                            ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('machine_id', name=op.f('pk_machine_points'))
    )


def downgrade() -> None:
    op.drop_table('machine_points')
    with op.batch_alter_table('rpo_samples', schema=None) as batch_op:
        batch_op.drop_index('ix_rpo_samples_machine_at')
    op.drop_table('rpo_samples')
