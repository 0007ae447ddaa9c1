// Facts about machines that pages derive from the API's jobs and the hosts' reports.

import { api } from '../lib.js';

export const TEST_RECOMMENDED_DAYS = 180;     // as ASR: a test failover is recommended after six months

/** Succeeded failover jobs (test ones among them), for lastTestFailover. */
export function succeededFailovers() {
  return api('/v1/jobs?kind=failover&state=succeeded&limit=1000');
}

/** Jobs an overview counts: everything open, and the failures (newest first, as many as the API gives). */
export async function openAndFailedJobs() {
  const lists = await Promise.all(['queued', 'running', 'waiting_for_input', 'failed'].map((state) => api(`/v1/jobs?state=${state}&limit=1000`)));
  return lists.flat();
}

const TEST_KINDS = new Set(['test_failover', 'test-failover']);

function isTestFailover(job) {
  return TEST_KINDS.has(job.kind) || (job.kind === 'failover' && job.params && job.params.kind === 'test');
}

/** The machine's newest succeeded test failover job, or null. */
export function lastTestFailover(name, jobs) {
  let best = null;
  for (const j of jobs) {
    if (j.machine === name && j.state === 'succeeded' && isTestFailover(j) && j.finished_at
        && (!best || j.finished_at > best.finished_at)) best = j;
  }
  return best;
}

/** Days since the machine's last test failover (Infinity when never). */
export function daysSinceTest(name, jobs, now = Date.now()) {
  const j = lastTestFailover(name, jobs);
  return j ? (now - new Date(j.finished_at).getTime()) / 86400000 : Infinity;
}

/** The primary host's statistics for the machine, from GET /v1/observed/machines (or {}). */
export function reportedStats(observed) {
  const stats = observed?.primary?.entry?.stats;
  return stats && typeof stats === 'object' ? stats : {};
}

/** A reason behind a health that is not Normal, its counts blanked so that equal causes group together
 * ("4 of 12 cycles missed" and "5 of 12 cycles missed" are one cause; names and ports like dr1:8444 stay). */
export function causeOf(reason) {
  return String(reason).replace(/(?<![\w:./-])\d+(\.\d+)?(?![\w:./-])/g, '#');
}

// as controller/failover.py's SITE_KINDS: one of these queued or running holds every other
export const SITE_KINDS = new Set(['failover', 'commit-failover', 'cancel-failover', 'cleanup-test-failover', 'reverse', 'failback']);

/** Which failover steps apply to the machine now, from its jobs (newest first or not), as the controller
 * decides them (controller/failover.py): none while a failover-family job is queued or running; commit and
 * cancel after a planned/unplanned failover that neither has followed; cleanup after a test failover that no
 * cleanup has followed. */
export function failoverSteps(jobs) {
  const mine = [...jobs].sort((a, b) => b.id - a.id);
  const busy = mine.some((j) => SITE_KINDS.has(j.kind) && (j.state === 'queued' || j.state === 'running'));
  const done = mine.filter((j) => j.state === 'succeeded');
  const isTest = (j) => j.kind === 'failover' && j.params?.kind === 'test';
  const lastReal = done.find((j) => ['commit-failover', 'cancel-failover'].includes(j.kind) || (j.kind === 'failover' && !isTest(j)));
  const lastTest = done.find((j) => j.kind === 'cleanup-test-failover' || isTest(j));
  return { busy, failedOver: !busy && !!lastReal && lastReal.kind === 'failover', testing: !busy && !!lastTest && isTest(lastTest) };
}

/** One point per replication cycle from the RPO samples (a cycle is sampled again every minute until the next
 * one): x its last success time (ms), with its size and duration as the host reported them. */
export function cyclesOf(samples) {
  const out = new Map();
  for (const s of samples) {
    if (!s.last_success_at || s.cycle_bytes === null || s.cycle_bytes === undefined) continue;
    out.set(s.last_success_at, { x: new Date(s.last_success_at).getTime(), bytes: s.cycle_bytes, seconds: s.cycle_seconds });
  }
  return [...out.values()].sort((a, b) => a.x - b.x);
}
