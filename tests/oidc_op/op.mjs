// A test-only OpenID Provider (npm's oidc-provider 9) on loopback, for the console's sign-in tests
// (tests/test_console_oidc.py). Not for any other use: its accounts sign in without a password.
// Start: OP_PORT=9090 OP_REDIRECT_URI=http://127.0.0.1:8000/admin/console/login/oidc/callback node op.mjs
// Control: POST /__test/state?login_as=NAME&tamper=aud|aud+azp|iss|nonce|&click=1|0
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';
import { SignJWT, importJWK } from 'jose';

const PORT = Number(process.env.OP_PORT ?? 9090);
const ISSUER = process.env.OP_ISSUER ?? `http://localhost:${PORT}`;   // another *site* than 127.0.0.1
const CLIENT_ID = process.env.OP_CLIENT_ID ?? 'console';
const CLIENT_SECRET = process.env.OP_CLIENT_SECRET ?? 'console-test-secret-not-for-production';
const REDIRECT_URI = process.env.OP_REDIRECT_URI;

// A fresh signing key per run; kept here so the test can also sign "tampered" ID tokens with it.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'op-test-1', alg: 'RS256', use: 'sig' };

// sub -> claims. The console maps `email` of alice to an admin; mallory is a valid OP user it must refuse.
const ACCOUNTS = {
  alice: { email: 'alice@example.org', email_verified: true },
  mallory: { email: 'mallory@example.org', email_verified: true },
  unverified: { email: 'alice@example.org', email_verified: false },
};
let loginAs = process.env.OP_LOGIN_AS ?? 'alice';
let tamper = null;                       // null | 'aud' | 'aud+azp' | 'iss' | 'nonce'
let click = false;                       // true: a one-button login page (see below)

const provider = new Provider(ISSUER, {
  clients: [{
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    redirect_uris: [REDIRECT_URI],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: ['op-test-cookie-signing-key'] },
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  conformIdTokenClaims: false,            // put scope-requested claims (email) into the ID token
  features: { devInteractions: { enabled: false } },
  async findAccount(ctx, sub) {
    if (!Object.hasOwn(ACCOUNTS, sub)) return undefined;
    return { accountId: sub, async claims() { return { sub, ...ACCOUNTS[sub] }; } };
  },
  // First-party test client: grant the requested scopes without a consent screen.
  async loadExistingGrant(ctx) {
    const { provider: op, client, account, session } = ctx.oidc;
    const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
    if (grantId) return op.Grant.find(grantId);
    const grant = new op.Grant({ clientId: client.clientId, accountId: account.accountId });
    grant.addOIDCScope('openid email');
    await grant.save();
    return grant;
  },
});

provider.use(async (ctx, next) => {
  // Test control: POST /__test/state?login_as=mallory&tamper=aud (tamper= empty resets it).
  if (ctx.method === 'POST' && ctx.path === '/__test/state') {
    if (ctx.query.login_as) loginAs = ctx.query.login_as;
    if ('tamper' in ctx.query) tamper = ctx.query.tamper || null;
    if ('click' in ctx.query) click = ctx.query.click === '1';
    ctx.status = 204;
    return;
  }
  // Auto-login: finish every interaction at once as `loginAs`, no page shown. With `click`: a one-button
  // page, so the way back to the console is a navigation started on the provider's site, as after a real
  // login form (without it the whole chain is redirects started by the console's own page).
  if (click && ctx.method === 'GET' && /^\/interaction\/[^/]+$/.test(ctx.path)) {
    ctx.type = 'html';
    ctx.body = `<!doctype html><title>OP</title><form method="post" action="${ctx.path}/login">` +
      `<button id="continue" type="submit">Continue as ${loginAs}</button></form>`;
    return;
  }
  if ((click ? ctx.method === 'POST' : ctx.method === 'GET') && ctx.path.startsWith('/interaction/')) {
    const { prompt } = await provider.interactionDetails(ctx.req, ctx.res);
    if (prompt.name !== 'login') ctx.throw(501, `unexpected prompt ${prompt.name}`);
    const to = await provider.interactionResult(
      ctx.req, ctx.res, { login: { accountId: loginAs } }, { mergeWithLastSubmission: false });
    ctx.redirect(to);
    return;
  }
  await next();
  // Post-processing of the token response: re-sign the ID token with bad claims on demand.
  if (tamper && ctx.oidc?.route === 'token' && ctx.status === 200 && ctx.body?.id_token) {
    const claims = JSON.parse(Buffer.from(ctx.body.id_token.split('.')[1], 'base64url'));
    if (tamper === 'aud') claims.aud = 'another-client';
    if (tamper === 'aud+azp') { claims.aud = 'another-client'; claims.azp = CLIENT_ID; }
    if (tamper === 'iss') claims.iss = 'http://localhost:1';
    if (tamper === 'nonce') claims.nonce = 'not-the-nonce';
    ctx.body.id_token = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'RS256', kid: jwk.kid })
      .sign(await importJWK(jwk, 'RS256'));
  }
});

provider.on('grant.error', (ctx, err) => console.error('grant.error', err.error, err.error_detail));
provider.listen(PORT, '127.0.0.1', () => console.log(`op ready ${ISSUER}`));
