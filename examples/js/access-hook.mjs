// An authorization hook for herald (HERALD_ACCESS_URL) in plain node:http:
// herald POSTs `{"version":1,"userId":"…","room":{"kind":"…","id":"…"}}`,
// signed, and this answers `{"allow":true,"campaignId":"…"}` or
// `{"allow":false}` from the application's own rule, `canView`.
//
//   HERALD_ACCESS_SECRET=… node access-hook.mjs          # listens on 127.0.0.1:3100
//   HERALD_ACCESS_URL=http://127.0.0.1:3100/herald/access HERALD_ACCESS_SECRET=… herald
//
// Every request is checked before anything else: `X-Herald-Timestamp` within
// 30 s of this clock, and `X-Herald-Signature: v1=<hex HMAC-SHA256 of
// "<timestamp>.<raw body>">` keyed with the shared secret, compared in
// constant time. A forged, altered or replayed request gets a 401 (herald
// treats any non-200 as an outage and tells its client "Unavailable", so a
// wrong secret shows up at once instead of looking like "no").
//
// The data below stands in for the application's database (the demo ids,
// plus a few users to show the rule). PORT=0 picks a free port; the line
// "access hook listening on <url>" says which.

import { createHmac, timingSafeEqual } from "node:crypto";
import http from "node:http";

const SECRET = process.env.HERALD_ACCESS_SECRET;
if (!SECRET) {
  console.error("set HERALD_ACCESS_SECRET (the same as herald's)");
  process.exit(2);
}
const PORT = Number(process.env.PORT ?? 3100);
const MAX_AGE_SECONDS = 30;
const MAX_BODY_BYTES = 16 * 1024;

// --- The application's data and rule -------------------------------------

/** Campaigns: visibility and each member's role. */
const campaigns = new Map([
  [
    "demo-campaign",
    {
      visibility: "private",
      roles: new Map([
        ["demo-user", "player"],
        ["gm-user", "gm"],
        ["banned-user", "banned"],
      ]),
    },
  ],
  ["open-campaign", { visibility: "public", roles: new Map([["banned-user", "banned"]]) }],
]);
const settlements = new Map([["demo-settlement", "demo-campaign"]]); // id -> campaign
const structures = new Map([["demo-structure", "demo-settlement"]]); // id -> settlement

/** The campaign a room belongs to, or null when the room does not exist. */
function campaignOf(kind, id) {
  switch (kind) {
    case "campaign":
      return campaigns.has(id) ? id : null;
    case "settlement":
      return settlements.get(id) ?? null;
    case "structure":
      return settlements.get(structures.get(id)) ?? null;
    default:
      return null;
  }
}

/**
 * The application's rule (CampaignMembershipService.canView): owners, GMs and
 * players see their campaign; anyone not banned sees a public one; a banned
 * user sees nothing of it.
 */
export function canView(campaignId, userId) {
  const campaign = campaigns.get(campaignId);
  if (!campaign) return false;
  const role = campaign.roles.get(userId);
  if (role === "banned") return false;
  if (role === "owner" || role === "gm" || role === "player") return true;
  return campaign.visibility === "public";
}

// --- The hook -------------------------------------------------------------

/** Whether the request is herald's, unaltered and fresh. */
function verified(headers, body) {
  const timestamp = headers["x-herald-timestamp"];
  const signature = headers["x-herald-signature"];
  if (typeof timestamp !== "string" || !/^\d{1,12}$/.test(timestamp) || typeof signature !== "string") return false;
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > MAX_AGE_SECONDS) return false;
  const expected = "v1=" + createHmac("sha256", SECRET).update(`${timestamp}.`).update(body).digest("hex");
  const given = Buffer.from(signature);
  return given.length === expected.length && timingSafeEqual(given, Buffer.from(expected));
}

function reply(res, status, body) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(body === undefined ? "" : JSON.stringify(body));
}

const server = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url !== "/herald/access") return reply(res, 404, { error: "not found" });
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      reply(res, 413, { error: "too large" });
      req.destroy();
    } else chunks.push(chunk);
  });
  req.on("end", () => {
    if (res.headersSent) return;
    const body = Buffer.concat(chunks);
    if (!verified(req.headers, body)) return reply(res, 401, { error: "bad signature" });
    let request;
    try {
      request = JSON.parse(body.toString("utf8"));
    } catch {
      return reply(res, 400, { error: "not JSON" });
    }
    const { version, userId, room } = request ?? {};
    if (version !== 1 || typeof userId !== "string" || typeof room?.kind !== "string" || typeof room?.id !== "string") {
      return reply(res, 400, { error: "unknown request" });
    }
    const campaignId = campaignOf(room.kind, room.id);
    const allow = campaignId !== null && canView(campaignId, userId);
    console.log(`check ${userId} ${room.kind}:${room.id} -> ${allow ? "allow" : "deny"}`);
    reply(res, 200, allow ? { allow: true, campaignId } : { allow: false });
  });
});

server.listen(PORT, "127.0.0.1", () => {
  console.log(`access hook listening on http://127.0.0.1:${server.address().port}/herald/access`);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.once(signal, () => server.close(() => process.exit(0)));
