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
